"""What `cic-gpt2 check` asks of every rank before an allocation is spent on training (#13 item 17).

Run under the same launcher line as training (`srun ... cic-gpt2 check --config run.yaml`): each rank
probes what it alone can see (its device, the data and model files on its node, the DeepSpeed op the
optimizer will load, the run dir on its filesystem and quota), then the ranks meet for a real all-reduce and
a shared-directory test (every rank writes a file, every rank must see all of them). Rank 0 prints one table
and the memory plan of the chosen ds_config; every rank exits 1 if any probe failed anywhere.
"""
from __future__ import annotations

import functools
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cic_gpt2 import dist


@functools.lru_cache(maxsize=None)
def _prepared(path: str):
    """The prepared dataset, read once for the probes that need it."""
    from cic_gpt2.prepared import Prepared

    return Prepared.load(path)


@dataclass(frozen=True)
class Probe:
    name: str
    ok: bool
    detail: str


def attempt(name: str, fn: Callable[[], str]) -> Probe:
    """`fn()`'s detail as a passing probe; any exception as a failing one (its first line)."""
    try:
        return Probe(name, True, fn())
    except Exception as e:  # a probe reports, it never stops the other probes
        text = str(e).strip().splitlines()
        return Probe(name, False, f"{type(e).__name__}: {text[0] if text else ''}"[:300])


def device_probe(info: dist.DistInfo) -> str:
    import torch

    dev = dist.device(info)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return (f"cuda:{dev.index} {props.name} {props.total_memory / 2**30:.1f} GiB "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return f"cpu ({os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"


def ops_probe(ds_dict: dict) -> str:
    """Load the compiled DeepSpeed op the optimizer will use (the JIT build happens here, not in training)."""
    import torch

    if not torch.cuda.is_available():
        return "torch AdamW on CPU: no compiled op"
    from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder

    from cic_gpt2.ds_config import offload_device

    offload = offload_device(ds_dict) != "none"
    builder = CPUAdamBuilder() if offload else FusedAdamBuilder()
    start = time.monotonic()
    builder.load(verbose=False)
    return (f"{builder.NAME} loaded in {time.monotonic() - start:.1f} s "
            f"(TORCH_EXTENSIONS_DIR={os.environ.get('TORCH_EXTENSIONS_DIR', 'default')})")


def inputs_probe(cfg) -> str:
    """The prepared data and the model (config, weights file, tokenizer) are readable on this node, offline."""
    from cic_gpt2.model import build_hf_config, load_model_tokenizer, model_source

    prepared = _prepared(cfg.data.path)
    tokenizer = load_model_tokenizer(cfg.model, prepared.manifest)
    prepared.check_tokenizer(tokenizer, what=f"model {cfg.model.name}'s tokenizer")
    build_hf_config(cfg.model, prepared.label_names, tokenizer)
    kind, path = model_source(cfg.model)
    if kind == "dir" and not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise FileNotFoundError(f"model dir {path} has no *.safetensors / pytorch_model*.bin weights")
    rows = sum(int(s["rows"]) for s in prepared.manifest["splits"].values())
    return f"{cfg.data.path}: {rows:,} rows; model {cfg.model.name} ({kind})"


def run_dir_probe(cfg, world_size: int, precision: str) -> str:
    """Writable, with room for one checkpoint within filesystem and quota (the checks train makes)."""
    from cic_gpt2 import preflight

    n_params = preflight.param_count_for(cfg.model, _prepared(cfg.data.path).label_names)
    estimate = preflight.check_run_dir(cfg.log.run_dir, n_params, world_size, precision,
                                       export=cfg.checkpoint.export, keep_last=cfg.checkpoint.keep_last)
    return f"writable, room for ~{preflight.gib(estimate.needed_bytes)}"


def allreduce_probe(world_size: int, comm_device) -> str:
    import torch
    import torch.distributed as tdist

    x = torch.tensor([float(tdist.get_rank() + 1)], device=comm_device)
    start = time.monotonic()
    tdist.all_reduce(x)
    want = world_size * (world_size + 1) / 2
    if float(x.item()) != want:
        raise RuntimeError(f"all-reduce summed to {float(x.item())}, expected {want}")
    return f"{tdist.get_backend()} {1000 * (time.monotonic() - start):.1f} ms"


def shared_dir_probe(run_dir: Path, rank: int, world_size: int, nonce: str) -> str:
    """Collective (two barriers): every rank writes `.check-<nonce>/rank<r>`; each must then see all of them."""
    import torch.distributed as tdist

    probe_dir = Path(run_dir) / f".check-{nonce}"
    wrote = None
    try:
        probe_dir.mkdir(parents=True, exist_ok=True)
        (probe_dir / f"rank{rank}").write_text(socket.gethostname())
        wrote = True
    except OSError as e:
        wrote = e
    tdist.barrier()
    seen = {p.name for p in probe_dir.glob("rank*")} if probe_dir.is_dir() else set()
    tdist.barrier()
    (probe_dir / f"rank{rank}").unlink(missing_ok=True)
    if wrote is not True:
        raise OSError(f"could not write in {probe_dir}: {wrote}")
    missing = [r for r in range(world_size) if f"rank{r}" not in seen]
    if missing:
        raise RuntimeError(f"run dir not shared: this rank does not see the files of rank(s) {missing} in "
                           f"{probe_dir}; put log.run_dir on a filesystem every node mounts")
    return f"shared by all {world_size} ranks"


def memory_plan(cfg, ds_dict: dict, world_size: int, gpu_mem_gib: float) -> str:
    """One line: the `bench memory` estimate for this model, batch and ds_config."""
    from cic_gpt2 import memory

    prepared = _prepared(cfg.data.path)
    seq_len = int(min(cfg.data.max_length or prepared.max_length, prepared.max_length))
    case = memory.MemoryCase(memory.model_shape(cfg.model.name), world_size, cfg.train.micro_batch_size, seq_len,
                             num_labels=len(prepared.label_names))
    est = memory.estimate_ds(case, ds_dict, gpu_mem_gib)
    from cic_gpt2.ds_config import precision_of

    return (f"memory plan: {cfg.model.name}, ZeRO-{est.stage}{' + offload' if est.offload else ''}, "
            f"{precision_of(ds_dict)}, micro batch {cfg.train.micro_batch_size} x {seq_len} tokens, "
            f"{world_size} rank(s): ~{est.total_bytes / 2**30:.2f} GiB per GPU, "
            f"{'fits' if est.fits else 'DOES NOT FIT'} {gpu_mem_gib:.0f} GiB")


def table(rows: list[tuple[int, str, list[Probe]]]) -> str:
    """Rank | host | one column per probe ('ok: detail' / 'FAIL: detail')."""
    names = [p.name for p in rows[0][2]]
    lines = ["| rank | host | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for rank, host, probes in rows:
        cells = [("ok: " if p.ok else "FAIL: ") + p.detail.replace("|", "/") for p in probes]
        lines.append(f"| {rank} | {host} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
