"""Checks that refuse a training run before any process group starts, with the numbers.

`check_train_run(cfg, manifest, world_size, precision, resume_from)` is the one call `train.main` makes, on
every rank before `dist.init`. What each check refuses, and the checkpoint-size estimate of
`estimate_checkpoint`: docs/RELIABILITY.md ("Refused before training starts").
"""
from __future__ import annotations

import errno
import math
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from cic_gpt2.errors import CicError, ConfigError

OPTIMIZER_BYTES_PER_PARAM = 12  # fp32 master + two Adam moments
WEIGHT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
EXPORT_BYTES_PER_PARAM = 4  # export_hf saves fp32 safetensors
OVERHEAD_RATIO = 0.10
OVERHEAD_BYTES = 64 << 20


@dataclass(frozen=True)
class CheckpointEstimate:
    param_count: int
    precision: str
    world_size: int
    checkpoint_bytes: int  # one checkpoint, all ranks' files together
    export_bytes: int
    needed_bytes: int  # checkpoint + export + overhead: what must be free before training starts
    files: int = 0  # files one checkpoint (+ export) creates: what a file-count quota must allow

    def describe(self) -> str:
        return (f"{self.param_count:,} parameters, {self.precision}, {self.world_size} rank(s): one checkpoint "
                f"~{gib(self.checkpoint_bytes)} ({OPTIMIZER_BYTES_PER_PARAM} B/param fp32 master + Adam, "
                f"partitioned over ranks, + {WEIGHT_BYTES[self.precision]} B/param weights)"
                + (f" + export ~{gib(self.export_bytes)}" if self.export_bytes else ""))


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def estimate_checkpoint(param_count: int, world_size: int, precision: str = "fp32",
                        export: bool = True) -> CheckpointEstimate:
    """Bytes one checkpoint (+ the export) of a `param_count` model needs on disk (see module docstring)."""
    if precision not in WEIGHT_BYTES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(WEIGHT_BYTES)}")
    checkpoint = param_count * (OPTIMIZER_BYTES_PER_PARAM + WEIGHT_BYTES[precision])
    export_bytes = param_count * EXPORT_BYTES_PER_PARAM if export else 0
    needed = math.ceil((checkpoint + export_bytes) * (1 + OVERHEAD_RATIO)) + OVERHEAD_BYTES
    # per rank: optimizer partition + RNG state; then model states, COMPLETE, latest, 3 side files, the tag
    # dir; the export: config, weights, tokenizer files, cic_gpt2.json, membership (about a dozen)
    files = 2 * world_size + 7 + (12 if export else 0)
    return CheckpointEstimate(param_count, precision, world_size, checkpoint, export_bytes, needed, files)


def param_count_for(model_cfg, label_names: list[str]) -> int:
    from cic_gpt2.model import build_hf_config
    from cic_gpt2.perf import param_count

    return param_count(build_hf_config(model_cfg, label_names), len(label_names), model_cfg.head)


# --------------------------------------------------------------------------------------------------
# Run directory
# --------------------------------------------------------------------------------------------------
def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def check_writable(run_dir: str | Path) -> Path:
    """Create `run_dir` (and parents) and write + delete a probe file in it; any failure is a CicError
    naming the path and the OS reason. An attempt, not `os.access`: root passes every permission check but
    still fails on a read-only mount, a full disk or a path under a regular file."""
    run_dir = Path(run_dir)
    probe = run_dir / f".write-probe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        blocker = _existing_ancestor(run_dir)
        hint = (f"{blocker} is a file, not a directory" if blocker.is_file()
                else "read-only filesystem" if e.errno == errno.EROFS else reason)
        raise CicError(f"run dir {run_dir} is not writable ({hint}): checkpoints and metrics could not be saved; "
                       f"pick another --run-dir (log.run_dir) or fix its permissions") from None
    return run_dir


def check_free_space(run_dir: str | Path, estimate: CheckpointEstimate, keep_last: int = 1,
                     disk_usage: Optional[Callable] = None, quotas: Optional[Callable] = None) -> int:
    """CicError unless `run_dir` has room for one checkpoint + export: on its filesystem, and within the
    user's and group's Lustre quotas (bytes and file count; `quota.lustre_quotas`, skipped without `lfs`).
    Returns the free bytes that bind."""
    from cic_gpt2.quota import lustre_quotas

    run_dir = Path(run_dir)
    free = int((disk_usage or shutil.disk_usage)(str(_existing_ancestor(run_dir))).free)
    peak = (f"keeping checkpoint.keep_last={keep_last} needs "
            f"~{gib(estimate.checkpoint_bytes * (keep_last + 1) + estimate.export_bytes)} at peak")
    if free < estimate.needed_bytes:
        raise CicError(
            f"not enough free space for one checkpoint in {run_dir}: needs ~{gib(estimate.needed_bytes)}, "
            f"{gib(free)} free ({estimate.describe()}; {peak}); "
            f"free space or pick a --run-dir on a larger filesystem"
        )
    for q in (quotas or lustre_quotas)(run_dir):
        if q.free_bytes is not None and q.free_bytes < estimate.needed_bytes:
            raise CicError(
                f"not enough quota for one checkpoint in {run_dir}: needs ~{gib(estimate.needed_bytes)}, "
                f"{gib(q.free_bytes)} left in the {q.describe()} ({estimate.describe()}; {peak}); delete files "
                f"(Alliance clusters: `diskusage_report` shows every quota) or pick a --run-dir under another quota")
        if q.free_files is not None and q.free_files < estimate.files:
            raise CicError(
                f"not enough file quota for one checkpoint in {run_dir}: it creates ~{estimate.files} files, "
                f"{q.free_files:,} left in the {q.describe()}; delete files (or tar small ones) or pick a "
                f"--run-dir under another quota")
        if q.free_bytes is not None:
            free = min(free, q.free_bytes)
    return free


def check_run_dir(run_dir: str | Path, model_param_count: int, world_size: int, precision: str = "fp32", *,
                  export: bool = True, keep_last: int = 1, disk_usage: Optional[Callable] = None,
                  quotas: Optional[Callable] = None) -> CheckpointEstimate:
    """The run dir can be written and holds one checkpoint (+ export) of this model; else CicError."""
    estimate = estimate_checkpoint(model_param_count, world_size, precision, export)
    check_writable(run_dir)
    check_free_space(run_dir, estimate, keep_last, disk_usage, quotas)
    return estimate


# --------------------------------------------------------------------------------------------------
# Batch arithmetic
# --------------------------------------------------------------------------------------------------
def check_batch(train_cfg, train_rows: int, world_size: int) -> int:
    """The global batch fits the training split at least once; returns the global batch size."""
    global_batch = train_cfg.micro_batch_size * train_cfg.grad_accum * world_size
    if train_rows < global_batch:
        raise ConfigError(
            f"the training split has {train_rows} rows, fewer than one global batch ({global_batch} = "
            f"train.micro_batch_size {train_cfg.micro_batch_size} x train.grad_accum {train_cfg.grad_accum} x "
            f"{world_size} ranks): lower train.micro_batch_size or train.grad_accum"
        )
    return global_batch


def saved_global_batch(tag_dir: str | Path) -> Optional[int]:
    """Global batch a checkpoint was trained with, from its run_config.yaml and COMPLETE marker (no torch)."""
    import json

    import yaml

    tag_dir = Path(tag_dir)
    try:
        run_cfg = yaml.safe_load((tag_dir / "run_config.yaml").read_text(encoding="utf-8"))
        world = json.loads((tag_dir / "COMPLETE").read_text(encoding="utf-8"))["world_size"]
        return int(run_cfg["train"]["micro_batch_size"]) * int(run_cfg["train"]["grad_accum"]) * int(world)
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None  # an older/foreign layout: checkpoint.load checks the client state after init


def check_resume_batch(resume_from: Optional[Path], global_batch: int, world_size: int) -> None:
    if resume_from is None:
        return
    saved = saved_global_batch(resume_from)
    if saved is not None and saved != global_batch:
        raise ConfigError(
            f"checkpoint {resume_from} was trained with global batch {saved}, this run has {global_batch}: the data "
            f"position would not match; set train.micro_batch_size / train.grad_accum so that "
            f"micro_batch_size x grad_accum x {world_size} ranks = {saved}"
        )


# --------------------------------------------------------------------------------------------------
# Everything `cic-gpt2 train` checks before dist.init
# --------------------------------------------------------------------------------------------------
STALE_LOCK_S = 1800  # an op build takes minutes; a lock this old was left by a build that was killed


def check_build_locks(max_age_s: float = STALE_LOCK_S, now: Optional[float] = None) -> None:
    """Refuse to start behind a stale torch-extensions build lock: torch waits on `<op>/lock` with no timeout,
    so a job killed mid-build (time limit, OOM) would make every later job on that directory wait forever."""
    import time

    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())  # as torch picks it
    if not root.is_dir():
        return
    now = time.time() if now is None else now
    for lock in sorted(root.glob("*/lock")) + sorted(root.glob("*/*/lock")):
        try:
            age = now - lock.stat().st_mtime
        except OSError:
            continue  # released while we looked
        if age > max_age_s:
            raise CicError(f"{lock}: a torch/DeepSpeed op build lock {age / 60:.0f} min old, left by a build that "
                           f"was killed; every job using {root} would wait on it forever. If no build is running "
                           f"there, delete it (rm {lock}), or prebuild the ops once on a login node "
                           f"(docs/launch.md, \"DeepSpeed's compiled op\")")


def check_train_run(cfg, manifest: dict, world_size: int, precision: str,
                    resume_from: Optional[Path] = None, disk_usage: Optional[Callable] = None
                    ) -> CheckpointEstimate:
    """Batch vs data, resume batch, run dir writable and roomy enough. Reads files only: call it on every rank
    after the config, data and resume target are known and before `dist.init`."""
    check_build_locks()
    global_batch = check_batch(cfg.train, int(manifest["splits"]["train"]["rows"]), world_size)
    check_resume_batch(resume_from, global_batch, world_size)
    n_params = param_count_for(cfg.model, list(manifest["label_names"]))
    return check_run_dir(cfg.log.run_dir, n_params, world_size, precision, export=cfg.checkpoint.export,
                         keep_last=cfg.checkpoint.keep_last, disk_usage=disk_usage)
