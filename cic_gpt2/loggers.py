"""Metric loggers: one protocol, `log(metrics, step)` / `close()`, several backends behind one fan-out.

`build_logger(run_dir, is_main)` gives rank 0 TensorBoard + JSONL and every other rank a `NullLogger`.
Keys, values and files: docs/training.md ("Outputs").
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Iterable, Mapping, Protocol

from cic_gpt2.files import write_text


class Logger(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    """For non-main ranks: accepts everything, writes nothing."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        return None

    def close(self) -> None:
        return None


def _scalar(key: str, value) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")


class JsonlLogger:
    """Appends one JSON object per `log` call: {"step": N, "time": unix_s, key: value, ...}.

    A fresh run (`resume_step=None`) starts the file anew. A resumed run keeps the lines up to the step it
    resumed from and drops the later ones (the steps it is about to redo), so the file reads like one
    uninterrupted run. Each line is flushed: a crash loses at most the line being written. Non-finite
    floats are written as null (valid JSON)."""

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        record: dict = {"step": int(step), "time": round(time.time(), 3)}
        for key, value in metrics.items():
            v = _scalar(key, value)
            record[key] = v if math.isfinite(v) else None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class TensorBoardLogger:
    """Scalars into RUN_DIR/tb (view: `tensorboard --logdir RUN_DIR/tb`)."""

    def __init__(self, log_dir: str | Path, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        # purge_step hides the events an interrupted run wrote after the checkpoint it resumes from.
        purge = resume_step + 1 if resume_step is not None else None
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, _scalar(key, value), global_step=int(step))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class LoggerContainer:
    """Fans each call out to every backend."""

    def __init__(self, loggers: Iterable[Logger]) -> None:
        self.loggers = list(loggers)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if metrics:
            for logger in self.loggers:
                logger.log(metrics, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


class SharedFailureLogger:
    """Every rank of a distributed run: rank 0's loggers write under `collective.on_main`, so a failed write
    (a disk quota: OSError) is the same one-line error on every rank at once, not a peer left waiting in the
    next collective for dist.timeout_s. Costs one small broadcast per log call (log steps only)."""

    def __init__(self, inner: Logger, is_main: bool, path: str | Path) -> None:
        self.inner, self.is_main, self.path = inner, is_main, path

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from cic_gpt2.collective import on_main

        on_main(self.is_main, f"writing the metrics of step {step} under {self.path}", self.inner.log, metrics, step)

    def close(self) -> None:
        self.inner.close()


def build_logger(run_dir: str | Path, is_main: bool, tensorboard: bool = True,
                 resume_step: int | None = None) -> Logger:
    """Rank 0: JSONL at RUN_DIR/metrics.jsonl (+ TensorBoard at RUN_DIR/tb). Other ranks: a NullLogger.
    `resume_step`: the step a resumed run continues from (None: a fresh run)."""
    if not is_main:
        return NullLogger()
    run_dir = Path(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    loggers: list[Logger] = [JsonlLogger(run_dir / "metrics.jsonl", resume_step)]
    if tensorboard:
        loggers.append(TensorBoardLogger(run_dir / "tb", resume_step))
    return LoggerContainer(loggers)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
