"""Resharding a checkpoint for another world size through DeepSpeed's universal format (#13 item 2).

Rank 0 converts `step-NNNNNN/` into `step-NNNNNN/universal/` with `python -m deepspeed.checkpoint.ds_to_universal`
(a subprocess with up to 8 extract/merge workers; minutes, for GPT-2-Large on Lustre possibly tens of minutes).
The other ranks wait in no collective meanwhile, so no NCCL/gloo timeout bounds the conversion: they poll a
status file rank 0 keeps beside the weights,

    step-NNNNNN/.universal.status.json    {"nonce", "state": "running" | "done" | "failed", "beat", "error"}

`nonce` is this launch's (`collective.check_shared_dir`'s), so a status file left by an earlier attempt is
never read as this one's. Rank 0 rewrites it every HEARTBEAT_S seconds while the converter runs. Every way
rank 0 can fail reaches every rank: an error (the converter's exit status, any exception,
`checkpoint.convert_timeout_s` exceeded, an interrupt) is written as `failed` and every rank raises the same
line; a rank 0 that dies without writing (SIGKILL, a lost node) stops the beat, and a peer that sees no new
beat for `dist.timeout_s` fails naming rank 0, as for any lost peer. `cic-gpt2 convert` runs the same
conversion offline, before the job; a training run then finds `universal/` complete and skips it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from cic_gpt2.checkpoint import COMPLETE_MARKER, UNIVERSAL_DIR, is_complete
from cic_gpt2.errors import CicError
from cic_gpt2.files import write_text

STATUS_FILE = ".universal.status.json"
LOG_FILE = ".universal.log"  # the converter's output (a file, not a pipe: a full pipe would stall it)
HEARTBEAT_S = 5.0
POLL_S = 1.0
MAX_WORKERS = 8


def default_workers() -> int:
    """Converter workers: the CPUs this process may use (its SLURM allocation), at most MAX_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cpus))


def converter_command(tag_dir: Path, output: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
            "--output_folder", str(output), "--inject_missing_state", "--num_extract_workers", str(workers),
            "--num_merge_workers", str(workers)]


def convert(tag_dir: Path, *, is_main: bool, nonce: Optional[str] = None, lost_after_s: float = 600.0,
            timeout_s: float = 0.0, workers: Optional[int] = None, saved_world_size: Optional[int] = None) -> Path:
    """`tag_dir/universal`, converted once by rank 0 (`is_main`); with a process group (`nonce` set) the other
    ranks wait for it through the status file. Every rank returns, or raises the same CicError."""
    tag_dir = Path(tag_dir)
    out = tag_dir / UNIVERSAL_DIR
    status = _Status(tag_dir / STATUS_FILE, nonce)
    if not is_main:
        status.wait_for_main(lost_after_s, tag_dir, saved_world_size)
        return out
    try:
        if not is_complete(out):
            _run(tag_dir, out, status, timeout_s, workers or default_workers(), saved_world_size)
    except Exception as e:
        message = str(e) if isinstance(e, CicError) else (
            f"converting {tag_dir} to a universal checkpoint failed on rank 0: {type(e).__name__}: {e}")
        status.write_quietly("failed", message)
        raise CicError(message) from e
    except BaseException:  # KeyboardInterrupt, SystemExit: the peers must not wait for a beat that stopped
        status.write_quietly("failed", f"rank 0 was interrupted while converting {tag_dir} to a universal "
                                       f"checkpoint; rerun the same command with --resume auto")
        raise
    status.write("done")
    return out


def _run(tag_dir: Path, out: Path, status: "_Status", timeout_s: float, workers: int,
         saved_world_size: Optional[int]) -> None:
    tmp = tag_dir / f".{UNIVERSAL_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    status.write("running")
    start = time.monotonic()
    with open(tag_dir / LOG_FILE, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(converter_command(tag_dir, tmp, workers), stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    code = proc.wait(timeout=HEARTBEAT_S)
                    break
                except subprocess.TimeoutExpired:
                    if timeout_s and time.monotonic() - start > timeout_s:
                        raise CicError(
                            f"converting {tag_dir} to a universal checkpoint took more than "
                            f"checkpoint.convert_timeout_s={timeout_s:g} s; raise it, or convert beforehand with "
                            f"`cic-gpt2 convert {tag_dir}`") from None
                    status.write("running")  # the heartbeat
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if code != 0:
        lines = (tag_dir / LOG_FILE).read_text(encoding="utf-8", errors="replace").strip().splitlines()
        ranks = f"{saved_world_size} " if saved_world_size else ""
        raise CicError(f"converting {tag_dir} (written by {ranks}ranks) to a universal checkpoint failed "
                       f"(exit {code}): {lines[-1] if lines else 'no output'} (log: {tag_dir / LOG_FILE}). Resume "
                       f"with {saved_world_size or 'the saved number of'} processes instead")
    shutil.copy(tag_dir / COMPLETE_MARKER, tmp / COMPLETE_MARKER)
    os.replace(tmp, out)


class _Status:
    """Rank 0's side of the status file (write) and every other rank's (wait_for_main). Without a nonce (no
    process group: nobody waits) writing does nothing."""

    def __init__(self, path: Path, nonce: Optional[str]):
        self.path, self.nonce, self.beat = path, nonce, 0

    def write(self, state: str, error: str = "") -> None:
        if self.nonce is None:
            return
        self.beat += 1
        write_text(self.path, json.dumps({"nonce": self.nonce, "state": state, "beat": self.beat,
                                          "time": time.time(), "pid": os.getpid(), "error": error}) + "\n")

    def write_quietly(self, state: str, error: str) -> None:
        try:
            self.write(state, error)
        except OSError:  # the disk that failed the conversion may fail this too: the beat stops instead
            pass

    def read(self) -> Optional[dict]:
        try:
            status = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # not written yet (or, on a non-POSIX filesystem, mid-replace)
            return None
        return status if isinstance(status, dict) and status.get("nonce") == self.nonce else None

    def wait_for_main(self, lost_after_s: float, tag_dir: Path, saved_world_size: Optional[int]) -> None:
        beat, changed = None, time.monotonic()
        while True:
            status = self.read()
            if status is not None:
                if status["state"] == "done":
                    return
                if status["state"] == "failed":
                    raise CicError(status["error"])
                if status["beat"] != beat:
                    beat, changed = status["beat"], time.monotonic()
            if time.monotonic() - changed > lost_after_s:
                seen = "no status of this launch" if beat is None else f"the last heartbeat (#{beat})"
                ranks = f"{saved_world_size} processes" if saved_world_size else "the saved number of processes"
                raise CicError(
                    f"rank 0 stopped converting {tag_dir} to a universal checkpoint: {seen} in {self.path} is "
                    f"over {lost_after_s:g} s old (dist.timeout_s; rank 0 killed or its node lost?). Rerun with "
                    f"--resume auto, resume with {ranks}, or convert beforehand with `cic-gpt2 convert {tag_dir}`")
            time.sleep(POLL_S)
