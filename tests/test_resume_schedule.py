"""Resuming under another LR schedule: refused with the keys and both values, or, with
train.extend_schedule=true, a decay re-planned from the resume step. Real DeepSpeed on CPU, one process,
the tiny GPT-2, the bundled real rows (conftest's `prepared_v2`)."""
import math
from pathlib import Path

import pytest

from cic_gpt2 import checkpoint as ckpt
from cic_gpt2.loggers import read_jsonl
from cic_gpt2.schedule import LrPlan
from test_train import train_here, train_single

LR, MIN_RATIO, WARMUP = 2e-3, 0.1, 2
COMMON = ["model.name=tiny", "model.dropout=0", f"train.lr={LR}", f"train.warmup_steps={WARMUP}",
          f"train.min_lr_ratio={MIN_RATIO}", "train.seed=7", "log.log_every=1", "log.progress=false",
          "log.tensorboard=false", "checkpoint.export=false", "checkpoint.keep_last=5"]


def lrs(run_dir: Path) -> dict[int, float]:
    """train/lr of each logged step (1-based): the engine's LR that optimizer step ran with."""
    return {r["step"]: r["train/lr"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/lr" in r}


@pytest.fixture(scope="module")
def eight_steps(prepared_v2, tmp_path_factory) -> Path:
    """8 steps, a checkpoint at 4 and at 8."""
    run_dir = tmp_path_factory.mktemp("sched") / "r8"
    train_single("--data", prepared_v2, "--run-dir", run_dir, *COMMON, "train.max_steps=8",
                 "checkpoint.every_steps=4")
    assert [s for s, _, ok in ckpt.list_checkpoints(run_dir / "checkpoints") if ok] == [4, 8]
    return run_dir


def test_resume_with_another_length_is_refused_naming_the_key_and_both_values(eight_steps, prepared_v2, tmp_path,
                                                                               capsys):
    tag = eight_steps / "checkpoints" / "step-000004"
    code = train_here("--data", prepared_v2, "--run-dir", tmp_path / "r16", "--resume", tag, *COMMON,
                      "train.max_steps=16")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cic-gpt2 train: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "train.max_steps 8 -> 16" in lines[0] and str(tag) in lines[0] and "train.extend_schedule=true" in lines[0]
    assert not (tmp_path / "r16" / "metrics.jsonl").exists()  # refused before anything ran


def test_extend_schedule_does_not_cover_a_change_of_lr(eight_steps, prepared_v2, tmp_path, capsys):
    code = train_here("--data", prepared_v2, "--run-dir", tmp_path / "r16", "--resume",
                      eight_steps / "checkpoints" / "step-000004", *(a for a in COMMON if not a.startswith("train.lr=")),
                      "train.max_steps=16", "train.lr=1e-3", "train.extend_schedule=true")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("cic-gpt2 train: error: ") and "train.lr 0.002 -> 0.001" in line
    assert "train.max_steps" not in line.split("differs in:")[1]


def expected_extended_lr(step0: int, start: int, start_ratio: float, total: int) -> float:
    """The documented rule (docs/training.md), cosine: from the LR at `start` down to min at the last step."""
    progress = (step0 - start) / (total - start - 1)
    return LR * (MIN_RATIO + (start_ratio - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_extend_schedule_continues_at_the_old_lr_and_decays_to_min_at_the_new_end(eight_steps, prepared_v2,
                                                                                  tmp_path):
    old = lrs(eight_steps)
    assert old[8] == pytest.approx(LR * MIN_RATIO)  # the 8-step run had decayed to its minimum
    extended = tmp_path / "r16"
    proc = train_single("--data", prepared_v2, "--run-dir", extended, "--resume",
                        eight_steps / "checkpoints" / "step-000004", *COMMON, "train.max_steps=16",
                        "train.extend_schedule=true", "checkpoint.every_steps=4")
    assert "LR decay re-planned from step 4" in proc.stdout
    new = lrs(extended)
    assert sorted(new) == list(range(5, 17))
    # Step 5 (0-based step 4, the resume step) runs with the LR the old run had there ...
    assert new[5] == pytest.approx(old[5], rel=1e-9)
    # ... and from there the decay is re-planned over 16 steps, reaching min_lr_ratio at the new last step.
    start_ratio = old[5] / LR
    for step in range(5, 17):
        assert new[step] == pytest.approx(expected_extended_lr(step - 1, 4, start_ratio, 16), rel=1e-9), step
    assert new[16] == pytest.approx(LR * MIN_RATIO)
    assert all(new[s + 1] < new[s] for s in range(5, 16))
    assert new[9] > old[8] * 2  # not the old curve's minimum carried on

    # The re-planned schedule rides in the checkpoint: resuming the extended run (same keys) follows it.
    marker = ckpt.read_marker(extended / "checkpoints" / "step-000008")
    assert LrPlan.from_dict(marker["lr_plan"]).decay_from == 4
    again = tmp_path / "again"
    train_single("--data", prepared_v2, "--run-dir", again, "--resume", extended / "checkpoints" / "step-000008",
                 *COMMON, "train.max_steps=16", "train.extend_schedule=true")
    assert lrs(again) == pytest.approx({s: new[s] for s in range(9, 17)}, rel=1e-9)


def test_plan_rule_units():
    plain = LrPlan(total_steps=8, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    assert plain.extended(8, 4) is plain
    during_warmup = plain.extended(16, 1)  # resumed inside warmup: the plain 16-step schedule
    fresh16 = LrPlan(total_steps=16, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    assert [during_warmup.ratio(s) for s in range(16)] == pytest.approx([fresh16.ratio(s) for s in range(16)])
    finished = plain.extended(16, 8)  # extending a finished run: it is at its minimum and stays there
    assert [finished.ratio(s) for s in range(8, 16)] == pytest.approx([0.1] * 8)
    linear = LrPlan(8, 0, "linear", 0.0).extended(12, 4)
    assert [linear.ratio(s) for s in (4, 11)] == pytest.approx([LrPlan(8, 0, "linear", 0.0).ratio(4), 0.0])
