"""Run torchrun or the DeepSpeed launcher so that a preemption ends in exit 75, as `cic-gpt2 train` does alone.

    python -m cic_gpt2.supervise -- python -m torch.distributed.run ... -m cic_gpt2 train --run-dir R ...

launch/torchrun.sh and launch/deepspeed.sh run their launcher under it. Both launchers take the first non-zero
worker status for a failure: they kill the other ranks, and torchrun prints a ChildFailedError traceback and
exits 1, so a job script that requeues on 75 would not. Here:

- the workers are told (`CIC_GPT2_PREEMPT_EXIT=0`) to exit 0 after the agreed preemption checkpoint, so the
  launcher waits for every rank and exits cleanly;
- the status returned is 75 when RUN_DIR/PREEMPTED (written by rank 0 after that checkpoint) names a complete
  checkpoint newer than the newest one at start, whatever the launcher returned; otherwise the launcher's own;
- SIGUSR1 / SIGTERM sent to this process (by `srun`, an sbatch trap, `kill`) are passed on as SIGUSR1 to the
  workers (the descendants that catch SIGUSR1), since neither launcher forwards SIGUSR1 itself.

The run dir comes from the `cic_gpt2 train` arguments in the command, read the way `cic-gpt2 train` reads them.
Preemption protocol and what each launcher returns: docs/launch.md.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from cic_gpt2 import preempt
from cic_gpt2.errors import CicError

POLL_S = 0.2  # how often the launcher is polled for exit and for workers a pending signal has not reached


def train_run_dir(command: Sequence[str]) -> Optional[Path]:
    """log.run_dir of the `cic_gpt2 train` in `command` (None: no such part, or arguments it would refuse)."""
    from cic_gpt2.config import RunConfig, load_config

    args = list(command)
    for i in range(len(args) - 1):
        if args[i] == "cic_gpt2" and args[i + 1] == "train":
            break
    else:
        return None
    parser = argparse.ArgumentParser(add_help=False)
    for flag in ("--config", "--data", "--run-dir", "--resume"):
        parser.add_argument(flag)
    try:
        known, rest = parser.parse_known_args(args[i + 2:])
        flags = {"data.path": known.data, "log.run_dir": known.run_dir, "checkpoint.resume": known.resume}
        overrides = [a for a in rest if "=" in a] + [f"{k}={v}" for k, v in flags.items() if v is not None]
        return Path(load_config(RunConfig, known.config, overrides).log.run_dir)
    except (CicError, OSError, SystemExit):
        return None  # `cic-gpt2 train` itself fails on these and says why


@dataclass(frozen=True)
class RunState:
    newest_step: int  # newest complete checkpoint's step, -1 when none
    marker: Optional[dict]


def run_state(run_dir: Path) -> RunState:
    from cic_gpt2.checkpoint import list_checkpoints

    steps = [step for step, _, complete in list_checkpoints(run_dir / "checkpoints") if complete]
    return RunState(max(steps, default=-1), preempt.read_marker(run_dir))


def preempted_checkpoint(run_dir: Path, before: RunState) -> Optional[Path]:
    """The checkpoint this run stopped at for a preemption: named by a marker written since `before`, complete,
    and newer than every checkpoint there was then. None otherwise."""
    from cic_gpt2.checkpoint import is_complete

    marker = preempt.read_marker(run_dir)
    if marker is None or marker == before.marker or not isinstance(marker.get("step"), int):
        return None
    tag_dir = Path(str(marker.get("checkpoint", "")))
    return tag_dir if marker["step"] > before.newest_step and is_complete(tag_dir) else None


# ---- signals: the workers are the descendants that catch SIGUSR1 (the launchers do not) ----------------------
def descendants(root: int) -> list[int]:
    """Every live descendant of `root`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # exited meanwhile
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in () may hold spaces
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def catches(pid: int, sig: signal.Signals) -> bool:
    """`pid` has a handler installed for `sig` (the SigCgt mask of /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


class Forwarder:
    """SIGUSR1/SIGTERM to this process -> SIGUSR1 to every worker under the launcher, each once. Workers still
    starting (no handler yet: the signal would kill them) get it as soon as they catch it."""

    def __init__(self) -> None:
        self.pending = False
        self.sent: set[int] = set()

    def install(self) -> None:
        for sig in preempt.PREEMPT_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher's whole process group itself

    def _on_signal(self, signum: int, frame) -> None:
        if not self.pending:
            print(f"supervise: {signal.Signals(signum).name}: asking the workers to checkpoint and exit",
                  file=sys.stderr, flush=True)
        self.pending = True

    def forward(self, launcher_pid: int) -> None:
        if not self.pending:
            return
        for pid in descendants(launcher_pid):
            if pid not in self.sent and catches(pid, signal.SIGUSR1):
                try:
                    os.kill(pid, signal.SIGUSR1)
                except ProcessLookupError:
                    continue
                self.sent.add(pid)


def supervise(command: Sequence[str]) -> int:
    """Run `command`; its exit status, or EXIT_REQUEUE when its training run stopped at a preemption checkpoint."""
    forwarder = Forwarder()
    forwarder.install()  # first: a signal from now on is kept for the workers, not the death of this process
    run_dir = train_run_dir(command)
    env = dict(os.environ)
    if run_dir is not None:  # without a run dir to read the marker from, the workers' 75 must stay 75
        env[preempt.EXIT_ENV] = "0"
        before = run_state(run_dir)
    try:
        launcher = subprocess.Popen(list(command), env=env)
    except OSError as e:
        print(f"supervise: cannot run {command[0]!r}: {e.strerror}", file=sys.stderr)
        return 127
    while True:
        try:
            status = launcher.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            forwarder.forward(launcher.pid)
    status = 128 - status if status < 0 else status  # killed by a signal: the shell's convention
    tag_dir = preempted_checkpoint(run_dir, before) if run_dir is not None else None
    if tag_dir is not None:
        print(f"supervise: preempted: checkpoint {tag_dir} is complete; exit {preempt.EXIT_REQUEUE} (run the same "
              f"command with --resume auto to continue)", file=sys.stderr)
        return preempt.EXIT_REQUEUE
    return status


def cli(argv: Sequence[str]) -> int:
    argv = list(argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m cic_gpt2.supervise -- LAUNCHER ... -m cic_gpt2 train ...", file=sys.stderr)
        return 2
    return supervise(argv)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
