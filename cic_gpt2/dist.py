"""Rank discovery and process-group setup. The only module that reads rank environment variables.

Sources, first match wins:
  * torchrun / the deepspeed launcher: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  * SLURM `srun`, one task per GPU: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_(STEP|JOB)_NODELIST;
    master = first host of the node list, port = MASTER_PORT or derived from SLURM_JOB_ID
  * OpenMPI `mpirun`: OMPI_COMM_WORLD_RANK / _LOCAL_RANK / _SIZE (+ MASTER_ADDR, default localhost)
  * nothing: one process (rank 0 of 1) on a free local port

`init()` exports the torch variables (deepspeed.init_distributed never reads SLURM_* and otherwise
falls into MPI discovery), picks nccl on CUDA and gloo elsewhere, and sets a collective timeout so
that a dead peer surfaces as an error instead of a hang.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

from cic_gpt2.errors import ConfigError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "openmpi" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except KeyError:
        raise ConfigError(f"environment variable {key} is required by this launch mode but not set") from None
    except ValueError:
        raise ConfigError(f"environment variable {key}={env[key]!r} is not an integer") from None


def _expand_bracket(prefix: str, body: str, suffix_hosts: list[str]) -> list[str]:
    out = []
    for part in body.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo) if lo.startswith("0") else 0
            for i in range(int(lo), int(hi) + 1):
                out.extend(f"{prefix}{i:0{width}d}{s}" for s in suffix_hosts)
        else:
            out.extend(f"{prefix}{part}{s}" for s in suffix_hosts)
    return out


def _expand_host(expr: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", expr)
    if not m:
        return [expr]
    return _expand_bracket(expr[: m.start()], m.group(1), _expand_host(expr[m.end():]))


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list: `gpu[01-04,07]`, `node-[1-2],login3`, `cdr[2-3]-ib[0-1]`."""
    hosts, depth, start = [], 0, 0
    text = nodelist.strip()
    for i, ch in enumerate(text + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            if text[start:i]:
                hosts.extend(_expand_host(text[start:i]))
            start = i + 1
    if depth != 0 or not hosts:
        raise ConfigError(f"cannot parse SLURM node list {nodelist!r}")
    return hosts


def _slurm_port(env: Mapping[str, str]) -> int:
    if "MASTER_PORT" in env:
        return _int(env, "MASTER_PORT")
    job_id = env.get("SLURM_JOB_ID", "0")
    digits = re.sub(r"\D", "", job_id) or "0"
    return 15000 + int(digits[-4:]) % 20000  # stable for all tasks of the job, clear of ephemeral ports


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def discover(env: Mapping[str, str] | None = None) -> DistInfo:
    """Work out this process's place in the job from its environment (see module docstring)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(
            rank=_int(env, "RANK"),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=_int(env, "WORLD_SIZE"),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ConfigError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: run under srun, or set MASTER_ADDR")
        return DistInfo(
            rank=_int(env, "SLURM_PROCID"),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            world_size=_int(env, "SLURM_NTASKS"),
            master_addr=env.get("MASTER_ADDR") or parse_nodelist(nodelist)[0],
            master_port=_slurm_port(env),
            source="slurm",
        )
    if "OMPI_COMM_WORLD_RANK" in env:
        return DistInfo(
            rank=_int(env, "OMPI_COMM_WORLD_RANK"),
            local_rank=int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")),
            world_size=_int(env, "OMPI_COMM_WORLD_SIZE"),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            source="openmpi",
        )
    return DistInfo(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(), "single")


def backend_for_device() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init(info: DistInfo, timeout_s: float = 600.0) -> str:
    """Create the default process group (every launch mode, world size 1 included). Returns the backend."""
    import torch
    import deepspeed

    if info.rank >= info.world_size or info.rank < 0:
        raise ConfigError(f"rank {info.rank} is outside world size {info.world_size} (launcher: {info.source})")
    os.environ.update(
        RANK=str(info.rank),
        LOCAL_RANK=str(info.local_rank),
        WORLD_SIZE=str(info.world_size),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )
    backend = backend_for_device()
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=timeout_s),
            verbose=False,
        )
    return backend


def device(info: DistInfo):
    import torch

    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def destroy() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
