"""Preemption: turn SIGUSR1 / SIGTERM into "checkpoint now, exit 75, requeue".

`PreemptionWatcher().install()` turns the signal into a local flag; `agreed()`, called by every rank after
every optimizer step, is the all-reduce that makes all ranks save and exit `EXIT_REQUEUE` at the same step.
After that checkpoint, `mark_preempted` (rank 0) writes RUN_DIR/PREEMPTED naming it: what `cic_gpt2.supervise`
reads to give torchrun and the DeepSpeed launcher status 75 (they take a worker's 75 for a failure).
The protocol with SLURM and the sbatch scripts: docs/launch.md ("Preemption and time limits").
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import FrameType
from typing import Callable, Mapping, Optional, Union

from cic_gpt2.errors import CicError, ConfigError

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again later"; the sbatch scripts requeue on it
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
PREEMPTED_MARKER = "PREEMPTED"  # in the run dir: {"step": N, "checkpoint": "<tag dir>"}
EXIT_ENV = "CIC_GPT2_PREEMPT_EXIT"
"""A worker's exit status after the agreed preemption checkpoint (default 75). `cic_gpt2.supervise` sets 0 for
the workers of torchrun / the DeepSpeed launcher: both kill the other ranks and report a failure (torchrun
exit 1 and a traceback) on the first non-zero worker status; the supervisor itself returns 75."""

_Handler = Union[Callable[[int, FrameType | None], object], int, None]


class EvaluationInterrupted(Exception):
    """Scoring stopped between two rounds because every rank agreed on a preemption signal (the trainer
    saves and exits EXIT_REQUEUE)."""


class PreemptionWatcher:
    """Local flag set by SIGUSR1/SIGTERM, and the collective that makes every rank agree on it."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPT_SIGNALS) -> None:
        self.signals = tuple(signals)
        self._requested = False
        self.received: signal.Signals | None = None
        """The first signal received (for the log line), None until then."""
        self._previous: dict[signal.Signals, _Handler] = {}

    def install(self) -> "PreemptionWatcher":
        """Catch the signals (main thread only, as Python requires). Returns self."""
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Give the signals back to the handlers that were there before `install()`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "PreemptionWatcher":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._requested:
            self.received = signal.Signals(signum)
        self._requested = True

    @property
    def requested(self) -> bool:
        """This process got a preemption signal (local knowledge; other ranks may not know yet)."""
        return self._requested

    def agreed(self) -> bool:
        """True on every rank iff any rank got a signal. A collective: call it on EVERY rank at the same
        step boundary (never inside a rank guard). Without a process group it is the local flag."""
        return _any_rank(self._requested)  # the one host sync per step this costs


def _any_rank(value: bool) -> bool:
    """True on every rank iff `value` is True on any rank (a collective; the local value without a group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    # nccl reduces device tensors only; gloo host tensors. One int32: the cost is the latency.
    on_cuda = dist.get_backend() == "nccl"
    flag = torch.tensor([int(value)], dtype=torch.int32,
                        device=torch.device("cuda", torch.cuda.current_device()) if on_cuda else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


# ---- the PREEMPTED marker: "this run stopped at a complete checkpoint; run it again with --resume auto" ----
def exit_status(env: Optional[Mapping[str, str]] = None) -> int:
    """The status a worker exits with after the agreed preemption checkpoint: EXIT_REQUEUE unless EXIT_ENV says."""
    env = os.environ if env is None else env
    text = env.get(EXIT_ENV, str(EXIT_REQUEUE))
    if not text.isdigit() or int(text) > 255:
        raise ConfigError(f"environment variable {EXIT_ENV}={text!r} is not an exit status (0-255); unset it")
    return int(text)


def clear_marker(run_dir: str | Path) -> None:
    """Rank 0, at start: an earlier run's marker must not make a supervisor take this run's exit for a preemption."""
    (Path(run_dir) / PREEMPTED_MARKER).unlink(missing_ok=True)


def read_marker(run_dir: str | Path) -> Optional[dict]:
    """The marker's content, or None when there is none (or it is not the JSON object `mark_preempted` writes)."""
    try:
        marker = json.loads((Path(run_dir) / PREEMPTED_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def mark_preempted(run_dir: str | Path, tag_dir: Path, step: int, is_main: bool) -> None:
    """Collective, on every rank after the agreed checkpoint: rank 0 writes the marker naming `tag_dir`; no rank
    returns before it exists (a supervisor on another node reads it once its launcher exits), and a failed
    write is the same error on every rank."""
    from cic_gpt2.files import write_text

    error = None
    if is_main:
        try:
            write_text(Path(run_dir) / PREEMPTED_MARKER,
                       json.dumps({"step": step, "checkpoint": str(Path(tag_dir).resolve())}) + "\n")
        except OSError as e:
            error = e
    if _any_rank(error is not None):
        raise CicError(f"checkpoint {tag_dir} is saved, but the marker {Path(run_dir) / PREEMPTED_MARKER} could not "
                       f"be written ({error or 'on rank 0'}): resume by hand with --resume auto")
