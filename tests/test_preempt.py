"""PreemptionWatcher: signals set a local flag; all ranks agree on it through one collective."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cic_gpt2.preempt import EXIT_REQUEUE, PreemptionWatcher


def test_exit_status_is_ex_tempfail():
    assert EXIT_REQUEUE == 75  # the sbatch scripts requeue on exactly this status


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_flag_without_process_group(sig):
    import torch.distributed as tdist

    assert not tdist.is_initialized()
    with PreemptionWatcher() as watcher:
        assert not watcher.requested and not watcher.agreed() and watcher.received is None
        os.kill(os.getpid(), sig)  # a real signal, delivered to this process
        assert watcher.requested and watcher.agreed()  # one process: the local flag is the agreement
        assert watcher.received == sig
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal changes nothing
        assert watcher.received == sig and watcher.requested


def test_uninstall_restores_previous_handlers():
    seen = []
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}

    def previous(signum, frame):
        seen.append(signum)

    signal.signal(signal.SIGUSR1, previous)
    try:
        watcher = PreemptionWatcher().install()
        watcher.install()  # idempotent: must not record itself as "previous"
        assert signal.getsignal(signal.SIGUSR1) == watcher._on_signal
        watcher.uninstall()
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1] and not watcher.requested
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_only_chosen_signals_are_caught():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher(signals=(signal.SIGUSR1,)):
        assert signal.getsignal(signal.SIGTERM) == before


WORKER = textwrap.dedent("""
    import json, os, sys, time
    import torch.distributed as dist
    from cic_gpt2.preempt import PreemptionWatcher

    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    watcher = PreemptionWatcher().install()
    with open(os.path.join(out_dir, f"pid{rank}.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.rename(os.path.join(out_dir, f"pid{rank}.tmp"), os.path.join(out_dir, f"pid{rank}"))
    step, agreed = 0, False
    while step < 3000 and not agreed:
        step += 1
        time.sleep(0.01 * (rank + 1))  # ranks run at different speeds, as real ones do
        agreed = watcher.agreed()       # the step boundary: every rank, every step
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"step": step, "agreed": agreed, "requested": watcher.requested}, f)
    dist.destroy_process_group()
    sys.exit(75 if agreed else 1)
""")


@pytest.mark.slow
def test_two_gloo_ranks_agree_when_only_one_is_signalled(tmp_path):
    """torchrun, 2 processes, gloo: SIGUSR1 reaches rank 1 only; both ranks stop at the same step."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", str(script), str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "pid1").exists() or not (tmp_path / "pid0").exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
        time.sleep(0.3)  # let a few steps pass with no signal: nobody may stop on its own
        os.kill(int((tmp_path / "pid1").read_text()), signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out  # torchrun reports the workers' failure status
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["requested"] is False and ranks[1]["requested"] is True
    assert ranks[0]["agreed"] and ranks[1]["agreed"]
    assert ranks[0]["step"] == ranks[1]["step"] > 1  # same boundary, and not before the signal


MARK_WORKER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch.distributed as dist
    from cic_gpt2.errors import CicError
    from cic_gpt2.preempt import mark_preempted, read_marker

    run_dir, tag = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        mark_preempted(run_dir, tag, 5, is_main=rank == 0)
        result = {"marker": read_marker(run_dir)}  # rank 1 reads it right after: it exists once the call returns
    except CicError as e:
        result = {"error": str(e)}
    (Path(sys.argv[3]) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
""")


@pytest.mark.slow
@pytest.mark.parametrize("writable", [True, False], ids=["written", "write-fails"])
def test_mark_preempted_is_seen_or_fails_on_every_rank(tmp_path, writable):
    """2 gloo ranks: the marker rank 0 writes exists on every rank when mark_preempted returns; a write that
    fails on rank 0 (the run dir is a file) is the same one-line error on both ranks."""
    script = tmp_path / "worker.py"
    script.write_text(MARK_WORKER)
    run_dir, tag = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-000005"
    if writable:
        tag.mkdir(parents=True)
    else:
        run_dir.write_text("not a directory")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", str(script), str(run_dir), str(tag), str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    if writable:
        assert ranks[0] == ranks[1] == {"marker": {"step": 5, "checkpoint": str(tag.resolve())}}
    else:
        assert "error" in ranks[0] and "error" in ranks[1]
        assert "could not be written" in ranks[1]["error"] and "--resume auto" in ranks[1]["error"]
