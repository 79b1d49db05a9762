"""Preemption during evaluation (#13 item 1): a SIGUSR1 that lands while validation or the final evaluation is
scoring is honoured between scoring rounds, not after the whole split. Real 2-rank gloo runs (RANK/WORLD_SIZE
set as torchrun would, without torchrun: its own exit status is tests/test_launch.py's business)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cic_gpt2.checkpoint import list_checkpoints
from cic_gpt2.files import free_port
from cic_gpt2.loggers import read_jsonl
from cic_gpt2.preempt import EXIT_REQUEUE
from conftest import wait_all

TIMEOUT_S = 300
# eval_micro_batch_size=1: ~800 single-row batches in the final evaluation, seconds of scoring to land in.
ARGS = ["model.name=tiny", "model.dropout=0", "train.max_steps=4", "train.micro_batch_size=4", "train.warmup_steps=1",
        "train.eval_micro_batch_size=1", "log.log_every=1", "log.progress=false", "log.tensorboard=false",
        "checkpoint.export=false", "dist.timeout_s=120", "train.seed=3"]


def start(run_dir: Path, data: Path, *extra: str) -> list[subprocess.Popen]:
    port = str(free_port())
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        with open(run_dir.parent / f"{run_dir.name}.rank{rank}.log", "a") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "cic_gpt2", "train", "--data", str(data), "--run-dir", str(run_dir),
                 *ARGS, *extra], env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def logs(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(run_dir.parent.glob(f"{run_dir.name}.*.log")))


def signal_when(procs, run_dir: Path, ready) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ready():
            assert all(p.poll() is None for p in procs), logs(run_dir)
            assert time.monotonic() < deadline, logs(run_dir)
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGUSR1)  # one rank only: the other learns it from the agreed flag
    except BaseException:
        for p in procs:
            p.kill()
        raise


@pytest.mark.slow
def test_preemption_during_the_final_evaluation_exits_75_and_resume_finishes(prepared_v2, tmp_path):
    """The last step is checkpointed BEFORE the final evaluation; a signal during it ends both ranks with 75
    within one scoring round (no metrics.json: nothing half-reported), and `--resume auto` redoes only the
    evaluation, reporting what an uninterrupted run reports."""
    run_dir = tmp_path / "final"
    procs = start(run_dir, prepared_v2, "checkpoint.every_steps=0")

    def final_step_saved():
        saved = list_checkpoints(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else []
        return any(step == 4 and complete for step, _, complete in saved)

    signal_when(procs, run_dir, final_step_saved)
    assert wait_all(procs, TIMEOUT_S) == [EXIT_REQUEUE, EXIT_REQUEUE], logs(run_dir)
    assert "during the final evaluation: saved step 4, exit 75" in logs(run_dir)
    assert not (run_dir / "metrics.json").exists()

    assert wait_all(start(run_dir, prepared_v2, "checkpoint.every_steps=0", "--resume", "auto"), TIMEOUT_S) == [0, 0], \
        logs(run_dir)
    reference = tmp_path / "reference"
    assert wait_all(start(reference, prepared_v2, "checkpoint.every_steps=0"), TIMEOUT_S) == [0, 0], logs(reference)
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
    assert got["step"] == want["step"] == 4
    for split in ("val", "test"):
        assert got[split]["confusion_matrix"] == want[split]["confusion_matrix"], split


@pytest.mark.slow
def test_preemption_during_periodic_validation_saves_and_the_resumed_run_validates_that_step(prepared_v2, tmp_path):
    """A signal while step 2 is being validated: both ranks save step 2 (marked val_pending) and exit 75; the
    resumed run validates step 2 first, so model selection sees every candidate an uninterrupted run sees."""
    run_dir = tmp_path / "periodic"
    procs = start(run_dir, prepared_v2, "train.eval_every=2", "checkpoint.every_steps=0")
    metrics = run_dir / "metrics.jsonl"
    signal_when(procs, run_dir, lambda: metrics.exists() and metrics.read_text().count('"train/loss"') >= 2)
    assert wait_all(procs, TIMEOUT_S) == [EXIT_REQUEUE, EXIT_REQUEUE], logs(run_dir)
    assert "while validating: saved step 2, exit 75" in logs(run_dir)
    saved = list_checkpoints(run_dir / "checkpoints")
    assert [(step, complete) for step, _, complete in saved] == [(2, True)]
    assert not any("val/macro_f1" in r for r in read_jsonl(metrics)), "the interrupted validation logged nothing"

    assert wait_all(start(run_dir, prepared_v2, "train.eval_every=2", "checkpoint.every_steps=0", "--resume", "auto"),
                    TIMEOUT_S) == [0, 0], logs(run_dir)
    val_steps = [r["step"] for r in read_jsonl(metrics) if "val/macro_f1" in r]
    assert val_steps[0] == 2 and 4 in val_steps, val_steps
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == 4
