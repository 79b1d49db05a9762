"""Rank discovery and process-group setup. The only module that reads rank environment variables.

`discover()` returns a frozen `DistInfo` from the first launcher whose variables are set (torchrun / the
deepspeed launcher, SLURM `srun`, OpenMPI `mpirun`; else one process); `init(info)` starts the process group.
The variables, master address and port, backend and collective timeout: docs/launch.md.
"""
from __future__ import annotations

import atexit
import datetime
import hashlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cic_gpt2.errors import ConfigError
from cic_gpt2.files import free_port

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
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                raise ValueError(part)
            width = len(lo)  # SLURM keeps the width of the low bound: 01-04 -> 01 02 03 04; 8-10 -> 8 9 10
            numbers = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            if not part:
                raise ValueError(body)
            numbers = [part]
        out.extend(f"{prefix}{n}{s}" for n in numbers for s in suffix_hosts)
    return out


def _expand_host(expr: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", expr)
    if not m:
        if "[" in expr or "]" in expr:
            raise ValueError(expr)
        return [expr]
    return _expand_bracket(expr[: m.start()], m.group(1), _expand_host(expr[m.end():]))


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list, in SLURM's order (`scontrol show hostnames`):
    `gpu[01-04,07]`, `node-[1-2],login3`, `cdr[2-3]-ib[0-1]` (the last bracket varies fastest)."""
    hosts, depth, start = [], 0, 0
    text = nodelist.strip()
    try:
        for i, ch in enumerate(text + ","):
            if ch == "[":
                depth += 1
            elif ch == "]":
                depth -= 1
            elif ch == "," and depth == 0:
                if text[start:i].strip():
                    hosts.extend(_expand_host(text[start:i].strip()))
                start = i + 1
            if depth not in (0, 1):
                raise ValueError(text)
    except ValueError:
        hosts = []
    if depth != 0 or not hosts:
        raise ConfigError(
            f"cannot parse SLURM node list {nodelist!r}; set MASTER_ADDR to the first node's host name instead"
        )
    return hosts


def _port(env: Mapping[str, str], default: int) -> int:
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else default
    if not 0 < port < 65536:
        raise ConfigError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return port


SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 22767  # 10000-32766: clear of the well-known ports and of Linux's ephemeral range (32768+)
SLURM_PORT_STEPS = 8  # step ids folded in: concurrent steps of one job (`srun ... &` twice) get their own ports


def slurm_port(job_id: str, step_id: str = "0") -> int:
    """A rendezvous port every task of a SLURM step computes alike: `10000 + (8 * job + step % 8) % 22767`.

    Two steps 0-7 of jobs fewer than 2845 ids apart never share a port, nor do the same step of two jobs fewer
    than 22767 ids apart (the span is odd, so 8 * job cycles through every port: step 0 of each job, what the
    sbatch scripts run, collides only for ids a multiple of 22767 apart; it was every 17000). A deterministic
    port can never be free of collisions for every pair of ids: MASTER_PORT overrides it (docs/launch.md)."""
    job = int(re.sub(r"\D", "", job_id) or "0")
    step = int(re.sub(r"\D", "", step_id) or "0") % SLURM_PORT_STEPS
    return SLURM_PORT_BASE + (SLURM_PORT_STEPS * job + step) % SLURM_PORT_SPAN


def slurm_batch_shell(env: Mapping[str, str]) -> bool:
    """This is the batch shell of a SLURM job with several tasks, not a task of an `srun` step: SLURM sets
    SLURM_PROCID=0 and SLURM_NTASKS=N there too, but only srun sets the SLURM_STEP_* variables. As rank 0 of N
    it would wait for N-1 peers that nothing starts."""
    in_step = any(k in env for k in ("SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_STEP_LAUNCHER_PORT"))
    return not in_step and env.get("SLURM_PROCID") == "0" and env.get("SLURM_NTASKS", "1").isdigit() \
        and int(env.get("SLURM_NTASKS", "1")) > 1


def discover(env: Mapping[str, str] | None = None) -> DistInfo:
    """Work out this process's place in the job from its environment (see module docstring)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        info = DistInfo(
            rank=_int(env, "RANK"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            world_size=_int(env, "WORLD_SIZE"),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_port(env, DEFAULT_PORT),
            source="torchrun",
        )
    elif slurm_batch_shell(env):
        # one process: nothing else will start (docs/launch.md). A world of 1, not a hang until the timeout.
        print(f"cic-gpt2: warning: this is the batch shell of a SLURM job with SLURM_NTASKS={env['SLURM_NTASKS']} "
              "(no srun step): running as ONE process on one device; to use every task, start it with "
              "`srun launch/srun.sh ...` (as slurm/*.sbatch do)", file=sys.stderr, flush=True)
        info = DistInfo(0, 0, 1, "127.0.0.1", _port(env, 0) if "MASTER_PORT" in env else free_port(), "single")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist and not env.get("MASTER_ADDR"):
            raise ConfigError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: run under srun, or set MASTER_ADDR")
        info = DistInfo(
            rank=_int(env, "SLURM_PROCID"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            # srun inside a bigger allocation (`srun -n 2` in a 4-task job) runs a step smaller than the job
            world_size=_int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"),
            master_addr=env.get("MASTER_ADDR") or parse_nodelist(nodelist)[0],
            master_port=_port(env, slurm_port(env.get("SLURM_JOB_ID", "0"),
                                              env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "0")))),
            source="slurm",
        )
    elif "OMPI_COMM_WORLD_RANK" in env:
        info = DistInfo(
            rank=_int(env, "OMPI_COMM_WORLD_RANK"),
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0,
            world_size=_int(env, "OMPI_COMM_WORLD_SIZE"),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_port(env, DEFAULT_PORT),
            source="openmpi",
        )
    else:
        info = DistInfo(0, 0, 1, "127.0.0.1", _port(env, 0) if "MASTER_PORT" in env else free_port(), "single")
    if not 0 <= info.rank < info.world_size or info.local_rank < 0:
        raise ConfigError(
            f"rank {info.rank} (local {info.local_rank}) does not fit world size {info.world_size} "
            f"(launcher: {info.source}); check the launcher's task count"
        )
    return info


def claim_gpu(visible: list[str], local_rank: int, claim_dir: Path) -> int:
    """The index, in this task's visible GPUs, of one no other task of this step on this node uses.

    srun `--gpu-bind=closest` gives every task the GPUs of its socket (2 of 4 each), and the default
    `--distribution=block:cyclic` puts local ranks 0 and 2 on one socket: neither `local_rank` (2 is out of range)
    nor `local_rank % visible` (0 and 2 both take GPU 0) is right. Each task claims a GPU (by its name in
    CUDA_VISIBLE_DEVICES) with an O_EXCL file in a node-local directory of this step, trying `local_rank % n`
    first, so tasks that see every GPU get GPU `local_rank` as before."""
    claim_dir.mkdir(parents=True, exist_ok=True)
    n = len(visible)
    for offset in range(n):
        index = (local_rank + offset) % n
        try:
            fd = os.open(claim_dir / f"gpu-{visible[index]}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(fd, f"local rank {local_rank} pid {os.getpid()}\n".encode())
        os.close(fd)
        atexit.register(lambda path=claim_dir / f"gpu-{visible[index]}": path.unlink(missing_ok=True))
        return index
    raise ConfigError(
        f"local rank {local_rank} has no GPU: its GPUs (CUDA_VISIBLE_DEVICES={','.join(visible)}) are all taken by "
        f"other tasks of this step on this node (claims in {claim_dir}); start one task per GPU"
    )


def _claim_dir(env: Mapping[str, str]) -> Path:
    """Node-local, one per job run, step and node: SLURM_TMPDIR (per job, removed at its end) else /tmp."""
    import socket

    run = "-".join(env.get(k, "0") for k in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"))
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "0"))
    base = env.get("SLURM_TMPDIR") or "/tmp"
    return Path(base) / f"cic-gpt2-gpus-{run}-step{step}-{socket.gethostname()}"


_local_device: dict[tuple, int] = {}


def local_cuda_index(info: DistInfo, visible_devices: int, env: Mapping[str, str] | None = None) -> int:
    """This process's CUDA device, chosen once (a SLURM task with several GPUs claims one: `claim_gpu`)."""
    env = os.environ if env is None else env
    key = (info.rank, info.local_rank, visible_devices)
    if key not in _local_device:
        if info.source == "slurm" and visible_devices > 1:
            names = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            if len(names) != visible_devices:
                names = [str(i) for i in range(visible_devices)]
            _local_device[key] = claim_gpu(names, info.local_rank, _claim_dir(env))
        else:
            _local_device[key] = cuda_index(info.local_rank, visible_devices)
    return _local_device[key]


def cuda_index(local_rank: int, visible_devices: int) -> int:
    """The CUDA device of this process. Usually `local_rank`; with one visible GPU per task (srun
    `--gpus-per-task=1` / `--gpu-bind`, which narrow CUDA_VISIBLE_DEVICES) it is device 0."""
    if visible_devices < 1:
        raise ConfigError("no CUDA device is visible to this process; check --gres / CUDA_VISIBLE_DEVICES")
    if visible_devices == 1:
        return 0
    if local_rank >= visible_devices:
        raise ConfigError(
            f"local rank {local_rank} has no GPU: only {visible_devices} are visible on this node; "
            "start one task per GPU (--ntasks-per-node = GPUs per node)"
        )
    return local_rank


def extensions_dir(env: Mapping[str, str] | None = None) -> str:
    """Where torch JIT-builds DeepSpeed's C++ ops (the CPU shared-memory comm op, on every run): TORCH_EXTENSIONS_DIR
    when set, else one directory per torch + DeepSpeed install under ~/.cache/torch_extensions.

    torch's own default (`~/.cache/torch_extensions/py311_cpu`) is shared by every install of one Python
    version, while each build command names its install's absolute paths (`-I .../site-packages/deepspeed/...`):
    two installs (a second clone's virtualenv; a launch script running another environment's `python`) then
    rebuild the op, 60-130 s on 2 cores, every time the other one ran. One directory per install: one build."""
    env = os.environ if env is None else env
    if env.get("TORCH_EXTENSIONS_DIR"):
        return env["TORCH_EXTENSIONS_DIR"]
    import torch

    origins = [str(getattr(importlib.util.find_spec(name), "origin", None)) for name in ("torch", "deepspeed")]
    key = hashlib.sha256("\n".join([torch.__version__, *origins]).encode()).hexdigest()[:12]
    cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "torch_extensions", f"cic-gpt2-py{sys.version_info[0]}{sys.version_info[1]}-{key}")


def backend_for_device() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init(info: DistInfo, timeout_s: float = 600.0) -> str:
    """Create the default process group (every launch mode, world size 1 included). Returns the backend.

    `timeout_s` (config `dist.timeout_s`) bounds every collective, so a dead peer surfaces as an error."""
    import torch
    import deepspeed

    backend = backend_for_device()
    local_device = info.local_rank
    if backend == "nccl":
        local_device = local_cuda_index(info, torch.cuda.device_count())
        torch.cuda.set_device(local_device)
    # DeepSpeed reads only these variables; LOCAL_RANK is the device index it binds to. The op build directory is
    # fixed before init_distributed builds its comm op, the same for every launcher and rank of this install.
    os.environ.update(
        TORCH_EXTENSIONS_DIR=extensions_dir(),
        RANK=str(info.rank),
        LOCAL_RANK=str(local_device),
        WORLD_SIZE=str(info.world_size),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )
    if not torch.distributed.is_initialized():
        # DeepSpeed creates its ZeRO data-parallel group with new_group() and no timeout, which falls back
        # to torch's module default (30 min on gloo): set it so a frozen peer surfaces after timeout_s.
        from torch.distributed import distributed_c10d

        distributed_c10d.default_pg_timeout = datetime.timedelta(seconds=timeout_s)
        if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
            distributed_c10d.default_pg_nccl_timeout = datetime.timedelta(seconds=timeout_s)
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=timeout_s),
            verbose=False,
        )
    return backend


def device(info: DistInfo):
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_cuda_index(info, torch.cuda.device_count()))
    return torch.device("cpu")


def destroy() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
