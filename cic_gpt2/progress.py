"""Progress that reads well on a terminal and in a log file.

`bar(...)` takes tqdm's arguments and returns a tqdm bar on an interactive terminal. Where output goes to a
file (stderr not a TTY) or the job runs under SLURM (`SLURM_JOB_ID` set), a bar's `\\r` redraws would fill
the log with one line per refresh, so it returns a `PlainProgress` instead: the same calls, one plain line
every `CIC_GPT2_PROGRESS_EVERY_S` seconds (default 30) and one at the end. `quiet_library_bars()` does the
same for the bars of transformers ("Loading weights", "Writing model shards"), datasets and huggingface_hub.

    CIC_GPT2_PROGRESS=1   tqdm bars even into a file / under SLURM
    CIC_GPT2_PROGRESS=0   plain lines even on a terminal
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Optional

from cic_gpt2.errors import CicError

ENV_FORCE = "CIC_GPT2_PROGRESS"
ENV_EVERY_S = "CIC_GPT2_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 30.0


def interactive(stream=None) -> bool:
    """True where bars should be drawn: CIC_GPT2_PROGRESS decides if set, else a TTY outside SLURM."""
    forced = os.environ.get(ENV_FORCE, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    if os.environ.get("SLURM_JOB_ID"):
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


def every_s() -> float:
    raw = os.environ.get(ENV_EVERY_S, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_EVERY_S
    except ValueError:
        raise CicError(f"{ENV_EVERY_S}={raw!r} must be a number of seconds (e.g. 30)") from None
    return max(0.0, value)


def bar(iterable: Optional[Iterable] = None, **kwargs: Any):
    """A tqdm bar (interactive, or `disable=True`: silent) or a PlainProgress, with tqdm's arguments."""
    from tqdm.auto import tqdm

    if kwargs.get("disable") or interactive(kwargs.get("file")):
        return tqdm(iterable, **kwargs)
    return PlainProgress(iterable, **kwargs)


class PlainProgress:
    """tqdm's calls (update, set_postfix[_str], reset, write, close, iteration, `with`) as plain log lines:
    `desc: n/total unit (pct%) elapsed, rate[, postfix]`, at most every `every_s` seconds, and at close."""

    def __init__(self, iterable: Optional[Iterable] = None, desc: Optional[str] = None, total: Optional[float] = None,
                 initial: float = 0, unit: str = "it", unit_scale: bool = False, file=None, **_ignored: Any):
        self.iterable, self.desc, self.unit, self.unit_scale, self.file = iterable, desc or "", unit.strip(), unit_scale, file
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.initial, self.emitted_n = total, initial, initial, initial
        self.every_s, self.postfix, self.closed = every_s(), "", False
        self.start = self.last = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._emit(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: Optional[str] = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def reset(self, total: Optional[float] = None) -> None:
        self.n = self.initial = self.emitted_n = 0
        self.total = total
        self.start = self.last = time.monotonic()

    @staticmethod
    def write(s: str, file=None, end: str = "\n") -> None:
        stream = file if file is not None else sys.stdout
        stream.write(s + end)
        stream.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.n != self.emitted_n:  # the final count, unless the last periodic line said it already
            self._emit(time.monotonic())

    def _count(self, value: float) -> str:
        if self.unit_scale:
            from tqdm import tqdm

            return tqdm.format_sizeof(value, divisor=1000)
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    def _emit(self, now: float) -> None:
        self.emitted_n = self.n
        elapsed = now - self.start
        done = self.n - self.initial
        text = f"{self.desc}: {self._count(self.n)}"
        if self.total:
            text += f"/{self._count(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {elapsed:.0f} s, {self._count(done / elapsed) if elapsed > 0 else '?'} {self.unit}/s"
        if self.postfix:
            text += f", {self.postfix}"
        stream = self.file if self.file is not None else sys.stderr
        stream.write(text + "\n")
        stream.flush()


def quiet_library_bars() -> None:
    """Turn off the bars of transformers, datasets and huggingface_hub where ours would be plain lines
    (the environment variables reach libraries not imported yet, and worker processes)."""
    if interactive():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers follows it too
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # any other library's tqdm bar (ours are PlainProgress here)
    for module, call in (("transformers.utils.logging", "disable_progress_bar"),
                         ("datasets.utils.logging", "disable_progress_bar"),
                         ("huggingface_hub.utils", "disable_progress_bars")):
        if module.split(".")[0] in sys.modules:  # imported already: the env var came too late for it
            getattr(sys.modules.get(module) or __import__(module, fromlist=[call]), call)()
