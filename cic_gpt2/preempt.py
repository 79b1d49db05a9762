"""Preemption: turn SIGUSR1 / SIGTERM into "checkpoint now, exit 75, requeue".

`PreemptionWatcher().install()` turns the signal into a local flag; `agreed()`, called by every rank after
every optimizer step, is the all-reduce that makes all ranks save and exit `EXIT_REQUEUE` at the same step.
The protocol with SLURM and the sbatch scripts: docs/launch.md ("Preemption and time limits").
"""
from __future__ import annotations

import signal
from types import FrameType
from typing import Callable, Union

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again later"; the sbatch scripts requeue on it
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

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
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self._requested
        # nccl reduces device tensors only; gloo host tensors. One int32: the cost is the latency.
        on_cuda = dist.get_backend() == "nccl"
        flag = torch.tensor([int(self._requested)], dtype=torch.int32,
                            device=torch.device("cuda", torch.cuda.current_device()) if on_cuda else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())  # the one host sync per step this costs
