"""DeepSpeed checkpoints that are complete or ignored, and resume that reproduces the run.

`Checkpointer` owns RUN_DIR/checkpoints for one run (what to resume from, the universal conversion, loading,
saving on its cadence); `save`, `load`, `latest_complete` and `prune` are its pieces. Layout, the COMPLETE
marker and resume at another world size: docs/training.md ("Checkpoints and resume").
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from cic_gpt2.collective import barrier, gather, on_main
from cic_gpt2.errors import CicError, ConfigError
from cic_gpt2.files import write_text
from cic_gpt2.resume_guard import check_same_run, rng_state, seed_new_rank, set_rng_state  # noqa: F401
from cic_gpt2.schedule import LrPlan, check_resume

COMPLETE_MARKER = "COMPLETE"
UNIVERSAL_DIR = "universal"
# ds_to_universal refuses checkpoints without this key in the client state.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}
_TAG_RE = re.compile(r"^step-(\d{6,})$")


def tag_for(step: int) -> str:
    return f"step-{step:06d}"


def is_complete(tag_dir: str | Path) -> bool:
    return (Path(tag_dir) / COMPLETE_MARKER).is_file()


def read_marker(tag_dir: str | Path) -> dict:
    return json.loads((Path(tag_dir) / COMPLETE_MARKER).read_text(encoding="utf-8"))


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """(step, tag dir, complete) for every `step-NNNNNN` dir, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for child in ckpt_dir.iterdir():
        m = _TAG_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child, is_complete(child)))
    return sorted(found)


def latest_complete(ckpt_dir: str | Path) -> Optional[Path]:
    complete = [path for _, path, ok in list_checkpoints(ckpt_dir) if ok]
    return complete[-1] if complete else None


def resolve_tag_dir(path: str | Path, verb: str) -> Path:
    """A complete `step-NNNNNN` tag dir from a tag dir, a checkpoints dir or a run dir (`verb`: for the error)."""
    path = Path(path)
    if not path.is_dir():
        raise CicError(f"checkpoint {path}: no such directory")
    if (path / "run_config.yaml").is_file() or is_complete(path):
        if not is_complete(path):
            raise CicError(f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} marker: the save was "
                           f"interrupted); {verb} an older step-* directory")
        return path
    for candidate in (path, path / "checkpoints"):
        latest = latest_complete(candidate)
        if latest is not None:
            return latest
    raise CicError(f"{path} holds no complete checkpoint (expected step-NNNNNN/ with a "
                   f"{COMPLETE_MARKER} marker, or RUN_DIR/checkpoints/)")


def verify(tag_dir: str | Path) -> Optional[str]:
    """None when every file the COMPLETE marker lists is there with its recorded size (a marker written
    before sizes were recorded lists none), else what is wrong, naming the file."""
    tag_dir = Path(tag_dir)
    try:
        files = read_marker(tag_dir).get("files", {})
    except (OSError, ValueError) as e:
        return f"its {COMPLETE_MARKER} marker is unreadable ({e})"
    for name, size in sorted(files.items()):
        path = tag_dir / name
        try:
            actual = path.stat().st_size
        except OSError:
            return f"{path} is missing"
        if actual != size:
            return f"{path} has {actual} bytes, the marker recorded {size}"
    return None


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def _quiet(text: str) -> None:
    return None


def previous_good(ckpt_dir: str | Path, before: Path, say=warn) -> Optional[Path]:
    """The newest complete checkpoint older than `before` whose files verify (None if none); each one
    skipped for damaged files is `say`-ed, naming the file."""
    older = [path for step, path, ok in list_checkpoints(ckpt_dir) if ok and path.name < before.name]
    for path in reversed(older):
        problem = verify(path)
        if problem is None:
            return path
        say(f"checkpoint {path} is damaged: {problem}; trying the previous complete one")
    return None


def resolve_resume(spec: str, run_dir: str | Path, say=warn) -> Optional[Path]:
    """`checkpoint.resume` -> the tag dir to load, or None for a fresh start.

    `none`: fresh. `auto`: the latest COMPLETE checkpoint under RUN_DIR/checkpoints whose files have the sizes
    its marker recorded (a damaged newer one is skipped with a warning naming the file), fresh if there is
    none. A path: that tag dir, which must be complete and undamaged."""
    if spec in ("none", ""):
        return None
    if spec == "auto":
        newest = latest_complete(Path(run_dir) / "checkpoints")
        if newest is None:
            return None
        problem = verify(newest)
        if problem is None:
            return newest
        chosen = previous_good(newest.parent, newest, say)
        say(f"checkpoint {newest} is damaged: {problem}; "
            + (f"resuming from the previous complete checkpoint {chosen}" if chosen else "no older complete one"))
        if chosen is None:
            raise ConfigError(f"the newest checkpoint {newest} is damaged ({problem}) and no older complete one "
                              f"verifies: resume from another run's checkpoint or start a new --run-dir")
        return chosen
    path = Path(spec)
    if not path.is_dir():
        raise ConfigError(f"checkpoint.resume={spec}: no such checkpoint directory")
    if not is_complete(path):
        raise ConfigError(
            f"checkpoint.resume={spec} is not a complete checkpoint (no {COMPLETE_MARKER} marker: the save was "
            f"interrupted); pick an older step-* directory or use --resume auto"
        )
    problem = verify(path)
    if problem:
        raise ConfigError(f"checkpoint.resume={spec} is damaged: {problem}; pick an older step-* directory or use "
                          f"--resume auto")
    return path


# --------------------------------------------------------------------------------------------------
# Save / prune / load
# --------------------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    """Flush a file (or a directory's entries) to stable storage: a node that crashes after the COMPLETE
    marker must not leave a "complete" checkpoint whose shards were still in its page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rank_of(name: str) -> int:
    """The rank a DeepSpeed/cic-gpt2 checkpoint file belongs to, from its name (`zero_pp_rank_3_...`,
    `rng_state_rank3.pt`, `mp_rank_00_...`: rank 0); 0 for a file without one."""
    m = re.search(r"rank_?(\d+)", name)
    return int(m.group(1)) if m else 0


def sync_own_files(tag_dir: Path, rank: int) -> None:
    """fsync the files of `tag_dir` this rank wrote, then the directory (every rank, before the barrier)."""
    for path in sorted(tag_dir.iterdir()):
        if path.is_file() and _rank_of(path.name) == rank:
            _fsync(path)
    _fsync(tag_dir)


def _bad_zip(tag_dir: Path, rank: int) -> str:
    """After a failed load: "FILE is damaged: " for the first of this rank's torch files (zip archives) whose
    CRCs do not check out, else ""."""
    import zipfile

    for path in sorted(tag_dir.glob("*.pt")):
        if _rank_of(path.name) == rank or path.name.startswith("mp_rank_"):
            try:
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
            except (OSError, zipfile.BadZipFile, RuntimeError) as e:
                bad = str(e)
            if bad:
                return f"{path} is damaged: "
    return ""


def file_sizes(tag_dir: Path) -> dict[str, int]:
    """{file name: bytes} of a saved tag dir, as the COMPLETE marker records them."""
    return {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir())
            if p.is_file() and p.name != COMPLETE_MARKER and not p.name.startswith(".")}


def _start_save(ckpt_dir: Path, tag_dir: Path) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if tag_dir.exists():  # a partial save of a crashed run, or a stale one: never mix files of two saves
        shutil.rmtree(tag_dir)


def _complete_save(tag_dir: Path, step: int, world_size: int, client_state: dict, side_files: dict[str, str],
                   keep_last: int, keep_steps: tuple[int, ...]) -> None:
    for name, text in side_files.items():
        _fsync(write_text(tag_dir / name, text))
    marker = {"step": step, "world_size": world_size, "time": time.time(), "files": file_sizes(tag_dir)}
    if "lr_plan" in client_state:  # read before the engine exists, to rebuild the LR schedule
        marker["lr_plan"] = client_state["lr_plan"]
    _fsync(write_text(tag_dir / COMPLETE_MARKER, json.dumps(marker) + "\n"))
    _fsync(tag_dir)
    latest = tag_dir.parent / "latest"  # DeepSpeed's pointer, rank 0's
    if latest.is_file():
        _fsync(latest)
    _fsync(tag_dir.parent)
    prune(tag_dir.parent, keep_last, keep_steps)


def save(
    engine,
    ckpt_dir: str | Path,
    step: int,
    client_state: dict,
    *,
    rank: int,
    world_size: int,
    is_main: bool,
    side_files: dict[str, str],
    keep_last: int,
    keep_steps: tuple[int, ...] = (),
) -> Path:
    """Save on EVERY rank (DeepSpeed's save is a collective). Returns the tag dir, complete on return.

    Each rank fsyncs its own files before the barrier; then rank 0 writes `side_files` ({file name: text}),
    the COMPLETE marker listing every file's size (resume verifies them), fsyncs, and prunes. Rank 0's work
    runs under `collective.on_main`: a failure there (quota) is the same error on every rank at once."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    on_main(is_main, f"preparing checkpoint dir {tag_dir}", _start_save, ckpt_dir, tag_dir)
    state = dict(client_state, world_size=world_size, **UNIVERSAL_INFO)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state)
    torch.save(rng_state(), tag_dir / f"rng_state_rank{rank}.pt")
    sync_own_files(tag_dir, rank)
    barrier()  # every rank's partition and RNG file is on stable storage
    # nobody leaves (e.g. to exit for requeue) before the marker exists: on_main ends in a broadcast
    on_main(is_main, f"completing checkpoint {tag_dir} (side files, {COMPLETE_MARKER}, pruning old ones)",
            _complete_save, tag_dir, step, world_size, client_state, side_files, keep_last, keep_steps)
    return tag_dir


def prune(ckpt_dir: str | Path, keep_last: int, keep_steps: tuple[int, ...] = ()) -> list[Path]:
    """Delete all but the newest `keep_last` COMPLETE checkpoints (rank 0 only), never those of `keep_steps`
    (the best-validation checkpoint). Partial ones are left alone: one may be a save in progress; the next
    save of the same tag replaces it."""
    complete = [path for step, path, ok in list_checkpoints(ckpt_dir) if ok and step not in keep_steps]
    doomed = complete[:-keep_last] if keep_last > 0 else []
    for path in doomed:
        # Remove the marker first: a crash mid-delete leaves a partial dir, never a "complete" broken one.
        (path / COMPLETE_MARKER).unlink()
        shutil.rmtree(path)
    return doomed


def saved_world_size(tag_dir: Path) -> int:
    return int(read_marker(tag_dir)["world_size"])


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def saved_run_config(tag_dir: Path) -> dict:
    """The resolved run config the checkpoint was trained with ({} for a checkpoint without one)."""
    path = Path(tag_dir) / "run_config.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def load(engine, tag_dir: Path, *, rank: int, world_size: int, global_batch_size: int, universal: bool) -> dict:
    """Load weights, optimizer partition, LR scheduler and this rank's RNG; returns our client state.
    `universal`: load from tag_dir/universal (the engine must have been built with checkpoint.load_universal)."""
    load_dir, tag = (tag_dir, UNIVERSAL_DIR) if universal else (tag_dir.parent, tag_dir.name)
    load_path, client_state = engine.load_checkpoint(
        str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CicError(f"DeepSpeed could not load checkpoint {tag_dir} (files missing?); pick another step-* dir")
    saved_global = int(client_state.get("global_batch_size", global_batch_size))
    if saved_global != global_batch_size:
        raise ConfigError(
            f"checkpoint {tag_dir} was trained with global batch {saved_global}, this run has {global_batch_size}: "
            f"the data position would not match; set train.micro_batch_size / train.grad_accum so that "
            f"micro_batch_size * grad_accum * world_size = {saved_global}"
        )
    rng_file = tag_dir / f"rng_state_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:  # a rank that did not exist when it was saved (universal resume onto more ranks)
        seed_new_rank(int(client_state.get("seed", 0)), rank, int(client_state.get("step", 0)))
    return client_state


# --------------------------------------------------------------------------------------------------
# The trainer's component
# --------------------------------------------------------------------------------------------------
class Checkpointer:
    """Owns RUN_DIR/checkpoints for one training run: what to resume from, the universal conversion
    when the world size changed, loading, and saving on its cadence (`checkpoint.every_steps`)."""

    def __init__(self, cfg, info, resume_from: Optional[Path], side_files: dict[str, str]):
        self.ckpt_dir = Path(cfg.log.run_dir) / "checkpoints"
        self.every_steps, self.keep_last = cfg.checkpoint.every_steps, cfg.checkpoint.keep_last
        self.info, self.resume_from, self.side_files = info, resume_from, side_files
        self.grad_clip = cfg.train.grad_clip
        self.lost_after_s, self.convert_timeout_s = cfg.dist.timeout_s, cfg.checkpoint.convert_timeout_s
        # A checkpoint from another world size is resharded through DeepSpeed's universal format.
        self.saved_world_size = saved_world_size(resume_from) if resume_from is not None else None
        self.universal = self.saved_world_size is not None and self.saved_world_size != info.world_size
        self.last_saved_step = -1

    @staticmethod
    def resolve(cfg, is_main: bool = True) -> Optional[Path]:
        """The tag dir `checkpoint.resume` names (None: a fresh start); refuses to start afresh over an
        earlier run's checkpoints, and to resume under another LR schedule (unless train.extend_schedule).
        Every rank resolves from its own listing (`agree` compares them); rank 0 prints the warnings."""
        resume_from = resolve_resume(cfg.checkpoint.resume, cfg.log.run_dir, warn if is_main else _quiet)
        if resume_from is None and latest_complete(Path(cfg.log.run_dir) / "checkpoints") is not None:
            raise ConfigError(f"{cfg.log.run_dir} already holds checkpoints of an earlier run: continue it with "
                              f"--resume auto, or pick a new --run-dir")
        if resume_from is not None:
            saved_train, step = saved_run_config(resume_from).get("train"), int(read_marker(resume_from)["step"])
            check_same_run(resume_from, step, _read_json(resume_from / "data_manifest.json"),
                           _read_json(Path(cfg.data.path) / "manifest.json") or {}, saved_train, cfg.train)
            check_resume(saved_train, cfg.train, resume_from, step)
        return resume_from

    def lr_plan(self, train_cfg, total_steps: int, steps_per_epoch: int) -> LrPlan:
        """The LR schedule of this run: a fresh one, the checkpoint's (which may itself be extended), or,
        with train.extend_schedule and another length, the checkpoint's extended from its step."""
        if self.resume_from is None:
            return LrPlan.of(train_cfg, total_steps)
        marker = read_marker(self.resume_from)
        if "lr_plan" in marker:
            saved = LrPlan.from_dict(marker["lr_plan"])
        else:  # saved before plans were recorded: its run config defines it
            old = saved_run_config(self.resume_from).get("train", {})
            if not old:
                return LrPlan.of(train_cfg, total_steps)
            old_total = old["max_steps"] or max(1, math.ceil(old["epochs"] * steps_per_epoch))
            saved = LrPlan(old_total, old["warmup_steps"], old["schedule"], old["min_lr_ratio"])
        if saved.total_steps == total_steps:
            return saved
        if train_cfg.extend_schedule:
            return saved.extended(total_steps, int(marker["step"]))
        return LrPlan.of(train_cfg, total_steps)  # same keys, another data size (epochs): this run's plan

    def engine_config(self, ds_dict: dict, nonce: Optional[str] = None) -> dict:
        """Every rank, when resharding: rank 0 converts the checkpoint while the others wait on its status
        file (`universal.convert`; `nonce`: this launch's, from check_shared_dir); returns the DeepSpeed dict
        that loads it."""
        from cic_gpt2.universal import convert  # universal imports this module

        if not self.universal:
            return ds_dict
        convert(self.resume_from, is_main=self.info.is_main, nonce=nonce, lost_after_s=self.lost_after_s,
                timeout_s=self.convert_timeout_s, saved_world_size=self.saved_world_size)
        return {**ds_dict, "checkpoint": {**ds_dict.get("checkpoint", {}), "load_universal": True}}

    def load(self, engine, global_batch_size: int) -> Optional[dict]:
        """The resumed client state (step, skipped_steps, ...), or None for a fresh start. Collective."""
        if self.resume_from is None:
            return None
        try:
            state, error = load(engine, self.resume_from, rank=self.info.rank, world_size=self.info.world_size,
                                global_batch_size=global_batch_size, universal=self.universal), None
        except ConfigError:
            raise
        except Exception as e:  # a damaged file of the right size (torch/pickle errors): fall back, all ranks
            state, error = None, f"{_bad_zip(self.resume_from, self.info.rank)}{type(e).__name__}: {str(e)[:160]}"
        errors = [(r, e) for r, e in enumerate(gather(error)) if e]
        if errors:
            rank, error = errors[0]
            previous = None if self.universal else previous_good(self.ckpt_dir, self.resume_from, self._say)
            if previous is None:
                raise CicError(f"checkpoint {self.resume_from} failed to load on rank {rank} ({error}) and no "
                               f"older complete checkpoint of this world size is left: start a new --run-dir")
            self._say(f"checkpoint {self.resume_from} failed to load on rank {rank} ({error}); resuming from the "
                      f"previous complete checkpoint {previous}")
            self.resume_from = previous
            return self.load(engine, global_batch_size)
        self.last_saved_step = int(state["step"])
        from cic_gpt2.resume_guard import apply_grad_clip

        note = apply_grad_clip(engine, saved_run_config(self.resume_from).get("train"), self.grad_clip)
        if note and self.info.is_main:
            print(note, flush=True)
        return state

    def _say(self, text: str) -> None:
        if self.info.is_main:
            warn(text)

    def due(self, step: int, total_steps: int) -> bool:
        """On the cadence, except the last step (the end of training saves it anyway)."""
        return bool(self.every_steps) and step % self.every_steps == 0 and step != total_steps

    def save(self, engine, step: int, client_state: dict, keep_steps: tuple[int, ...] = ()) -> None:
        """Collective: every rank calls it at the same step. A step already saved is not saved again.
        Pruning keeps the newest `checkpoint.keep_last` and the tags of `keep_steps` (the best one)."""
        if step == self.last_saved_step:
            return
        save(engine, self.ckpt_dir, step, client_state, rank=self.info.rank, world_size=self.info.world_size,
             is_main=self.info.is_main, side_files=self.side_files, keep_last=self.keep_last, keep_steps=keep_steps)
        self.last_saved_step = step

    def load_weights(self, engine, step: int) -> None:
        """Put the module weights saved at `step` back into the engine (the best-validation model, for the
        final test and the export); optimizer and schedule are left as they are. Collective."""
        path, _ = engine.load_checkpoint(str(self.ckpt_dir), tag=tag_for(step), load_module_only=True,
                                         load_optimizer_states=False, load_lr_scheduler_states=False)
        if path is None:
            raise CicError(f"the best checkpoint {self.ckpt_dir / tag_for(step)} could not be loaded (deleted?); "
                           f"export it by hand with `cic-gpt2 export` or rerun with train.select_best=false")
