"""Preemption: turn SIGUSR1 / SIGTERM into "checkpoint now, exit 75, requeue".

SLURM sends the batch shell SIGUSR1 some minutes before the time limit (`#SBATCH --signal=B:USR1@180`);
the sbatch script forwards it to the training step (slurm/*.sbatch). Only the ranks that get the signal
know about it, and they may get it at different steps, so no rank acts on its own flag: after every
optimizer step all ranks call `agreed()`, a one-integer all-reduce MAX, and all see the same answer at
the same step. Then all of them save the checkpoint together (a collective) and exit `EXIT_REQUEUE`,
which the sbatch script turns into `scontrol requeue`; the restarted job runs with `--resume auto`.

    watcher = PreemptionWatcher().install()
    for step in ...:
        engine.step()
        if watcher.agreed():          # every rank, same boundary
            save_checkpoint(...)      # every rank
            return EXIT_REQUEUE

A handler only sets a flag: nothing else is safe to do in a signal handler, and the flag is read at the
next step boundary. A second signal changes nothing (the checkpoint is already coming).
"""
from __future__ import annotations

import signal
from types import FrameType
from typing import Callable, Union

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again later"; the sbatch scripts requeue on it
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_Handler = Union[Callable[[int, FrameType | None], object], int, None]


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
