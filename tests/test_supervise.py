"""cic_gpt2.supervise: the launcher's status after a preemption, signal forwarding, the run dir it reads.

A fake launcher (a Python process that starts worker processes, as torchrun does) keeps these fast; the real
torchrun / DeepSpeed launcher runs are in tests/test_launch.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cic_gpt2 import preempt, supervise

REPO = Path(__file__).resolve().parent.parent

# The fake launcher: starts 2 workers, waits for them, exits with LAUNCHER_EXIT if set, else 1 if any worker
# failed (torchrun's rule), else 0. Its argv ends in `-m cic_gpt2 train ...` like torchrun's, for the run dir.
LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys
    workers = [subprocess.Popen([sys.executable, os.environ["WORKER"], str(rank)]) for rank in range(2)]
    codes = [w.wait() for w in workers]
    sys.exit(int(os.environ.get("LAUNCHER_EXIT", int(any(codes)))))
""")
# A worker: installs its SIGUSR1 handler only after a while (a signal before then would kill it: the supervisor
# must wait for the handler), says it is ready, waits for the signal; rank 0 then writes a complete checkpoint
# and the PREEMPTED marker the way `cic-gpt2 train` does, and every worker exits with CIC_GPT2_PREEMPT_EXIT.
WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
    from cic_gpt2 import preempt
    rank, out = int(sys.argv[1]), Path(os.environ["OUT"])
    time.sleep(float(os.environ.get("HANDLER_DELAY_S", "0")))
    watcher = preempt.PreemptionWatcher().install()
    (out / f"ready{rank}").write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not (watcher.requested or (out / "agreed").exists()) and time.monotonic() < deadline:
        time.sleep(0.02)  # the stand-in for the all-reduce that makes every rank stop at the same step
    if watcher.requested:
        (out / "agreed").touch()
    elif os.environ.get("OWN_SIGNAL_TOO") == "1":  # the other worker agreed first; our forwarded signal is coming
        while not watcher.requested and time.monotonic() < deadline:
            time.sleep(0.02)
    (out / f"worker{rank}.json").write_text(json.dumps(
        {"signal": watcher.received.name if watcher.received else None, "exit_env": os.environ.get(preempt.EXIT_ENV)}))
    if not (out / "agreed").exists():
        sys.exit(9)
    run_dir = Path(os.environ["RUN_DIR"])
    tag = run_dir / "checkpoints" / "step-000007"
    if rank == 0:
        tag.mkdir(parents=True, exist_ok=True)
        if os.environ.get("COMPLETE", "1") == "1":
            (tag / "COMPLETE").write_text("{}")
        preempt.mark_preempted(run_dir, tag, 7, is_main=True)
    while not (run_dir / preempt.PREEMPTED_MARKER).exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # mark_preempted's barrier
    sys.exit(preempt.exit_status())
""")


@pytest.fixture
def fake(tmp_path):
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "worker.py").write_text(WORKER)
    run_dir = tmp_path / "run"
    env = {**os.environ, "WORKER": str(tmp_path / "worker.py"), "OUT": str(tmp_path), "RUN_DIR": str(run_dir),
           "PYTHONPATH": str(REPO)}
    env.pop(preempt.EXIT_ENV, None)
    cmd = [sys.executable, "-m", "cic_gpt2.supervise", "--", sys.executable, str(tmp_path / "launcher.py"),
           "-m", "cic_gpt2", "train", "--data", "d", "--run-dir", str(run_dir)]
    return tmp_path, run_dir, env, cmd


def _start_and_signal(tmp: Path, env: dict, cmd: list[str], sig: signal.Signals, target: str = "supervisor"):
    """Start the supervisor; send `sig` to it as soon as it runs the launcher (the workers may not have their
    handlers yet), or to worker 1 once it has one; wait for the end."""
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        ready = (lambda: supervise.descendants(proc.pid)) if target == "supervisor" else (tmp / "ready1").exists
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        if target == "supervisor":
            proc.send_signal(sig)
        else:
            os.kill(int((tmp / "ready1").read_text()), sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_to_the_supervisor_reaches_every_worker_and_ends_in_75(fake, sig):
    tmp, run_dir, env, cmd = fake
    status, err = _start_and_signal(tmp, {**env, "HANDLER_DELAY_S": "1.5", "OWN_SIGNAL_TOO": "1"}, cmd, sig)
    workers = [json.loads((tmp / f"worker{r}.json").read_text()) for r in (0, 1)]
    # forwarded as SIGUSR1, once each, to workers that caught it (none killed by a signal before its handler)
    assert [w["signal"] for w in workers] == ["SIGUSR1", "SIGUSR1"], err
    assert [w["exit_env"] for w in workers] == ["0", "0"]  # workers exit 0: the launcher sees no failure
    assert status == preempt.EXIT_REQUEUE, err
    assert f"checkpoint {run_dir.resolve() / 'checkpoints' / 'step-000007'} is complete" in err
    assert "Traceback" not in err


def test_usr1_to_one_worker_ends_in_75(fake):
    tmp, run_dir, env, cmd = fake
    status, err = _start_and_signal(tmp, env, cmd, signal.SIGUSR1, target="worker")
    workers = [json.loads((tmp / f"worker{r}.json").read_text()) for r in (0, 1)]
    assert [w["signal"] for w in workers] == [None, "SIGUSR1"]
    assert status == preempt.EXIT_REQUEUE, err


def test_launcher_failure_after_a_complete_preemption_checkpoint_is_75(fake):
    """torchrun killed by SIGTERM kills its workers and exits non-zero; if they had saved, it is still a requeue."""
    tmp, run_dir, env, cmd = fake
    status, err = _start_and_signal(tmp, {**env, "LAUNCHER_EXIT": "1"}, cmd, signal.SIGUSR1, target="worker")
    assert status == preempt.EXIT_REQUEUE, err


def test_incomplete_checkpoint_passes_the_launchers_status_through(fake):
    tmp, run_dir, env, cmd = fake
    status, err = _start_and_signal(tmp, {**env, "COMPLETE": "0", "LAUNCHER_EXIT": "3"}, cmd, signal.SIGUSR1)
    assert status == 3, err
    assert "preempted" not in err


def test_a_marker_from_before_the_start_is_not_this_runs_preemption(tmp_path):
    run_dir = tmp_path / "run"
    tag = run_dir / "checkpoints" / "step-000007"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text("{}")
    preempt.mark_preempted(run_dir, tag, 7, is_main=True)
    before = supervise.run_state(run_dir)
    assert before.newest_step == 7 and before.marker["step"] == 7
    assert supervise.preempted_checkpoint(run_dir, before) is None  # unchanged since the start
    preempt.clear_marker(run_dir)
    preempt.mark_preempted(run_dir, tag, 7, is_main=True)  # rewritten, but not newer than the start's newest
    assert supervise.preempted_checkpoint(run_dir, supervise.RunState(7, None)) is None
    assert supervise.preempted_checkpoint(run_dir, supervise.RunState(6, None)) == tag.resolve()


def test_status_passes_through_and_signal_deaths_read_as_128_plus_n(tmp_path):
    run_dir = tmp_path / "run"
    for code, want in (("0", 0), ("4", 4)):
        out = subprocess.run([sys.executable, "-m", "cic_gpt2.supervise", "--", sys.executable, "-c",
                              f"import sys; sys.exit({code})", "cic_gpt2", "train", "--run-dir", str(run_dir)],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == want, out.stderr
    out = subprocess.run([sys.executable, "-m", "cic_gpt2.supervise", "--", sys.executable, "-c",
                          "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 128 + signal.SIGKILL


def test_without_a_run_dir_workers_keep_their_75(tmp_path):
    """No `cic_gpt2 train` arguments to find the marker from: the workers are not told to exit 0."""
    code = f"import os, sys; sys.exit(0 if os.environ.get({preempt.EXIT_ENV!r}) is None else 5)"
    out = subprocess.run([sys.executable, "-m", "cic_gpt2.supervise", "--", sys.executable, "-c", code],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_usage_and_missing_launcher_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cic_gpt2.supervise"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "usage" in out.stderr
    out = subprocess.run([sys.executable, "-m", "cic_gpt2.supervise", "--", str(tmp_path / "nope")], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 127 and out.stderr.count("\n") == 1 and "nope" in out.stderr


def test_train_run_dir_reads_the_arguments_like_cic_gpt2_train(tmp_path):
    head = ["python", "-m", "torch.distributed.run", "--standalone", "-m", "cic_gpt2", "train"]
    assert supervise.train_run_dir(head + ["--data", "d", "--run-dir", "runs/a"]) == Path("runs/a")
    assert supervise.train_run_dir(head + ["log.run_dir=runs/b", "train.lr=1e-4"]) == Path("runs/b")
    config = tmp_path / "run.yaml"
    config.write_text("log:\n  run_dir: runs/c\n")
    assert supervise.train_run_dir(head + ["--config", str(config)]) == Path("runs/c")
    assert supervise.train_run_dir(head + ["--config", str(config), "--run-dir", "runs/d"]) == Path("runs/d")
    assert supervise.train_run_dir(head + ["no.such_key=1"]) is None  # train refuses it and says why
    assert supervise.train_run_dir(["python", "-m", "torch.distributed.run", "script.py"]) is None


def test_exit_status_env(monkeypatch):
    assert preempt.exit_status({}) == preempt.EXIT_REQUEUE
    assert preempt.exit_status({preempt.EXIT_ENV: "0"}) == 0
    for bad in ("x", "-1", "300"):
        with pytest.raises(preempt.ConfigError, match=preempt.EXIT_ENV):
            preempt.exit_status({preempt.EXIT_ENV: bad})


def test_descendants_and_catches(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGUSR1, lambda *a: None)
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        print(grandchild.pid, flush=True)
        time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        assert set(supervise.descendants(os.getpid())) >= {child.pid, grandchild}
        assert supervise.descendants(child.pid) == [grandchild]
        assert supervise.catches(child.pid, signal.SIGUSR1) and not supervise.catches(grandchild, signal.SIGUSR1)
        os.kill(grandchild, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
