"""A resume must continue the same run (#13 item 6): another prepared dataset or train.seed is refused, naming
the keys and both values; a changed train.grad_clip is applied (DeepSpeed would restore the checkpoint's) and
said. Real DeepSpeed on CPU, one process, the tiny GPT-2, the bundled real rows."""
from pathlib import Path

import pytest
import torch

from cic_gpt2 import checkpoint as ckpt
from conftest import SAMPLE_V2, run_cli
from test_train import torchrun, train_here, train_single

COMMON = ["model.name=tiny", "model.dropout=0", "train.seed=7", "train.max_steps=4", "log.log_every=1",
          "log.progress=false", "log.tensorboard=false", "checkpoint.export=false", "checkpoint.every_steps=2"]


@pytest.fixture(scope="module")
def four_steps(prepared_v2, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("guard") / "r4"
    train_single("--data", prepared_v2, "--run-dir", run_dir, *COMMON)
    assert [s for s, _, ok in ckpt.list_checkpoints(run_dir / "checkpoints") if ok] == [2, 4]
    return run_dir


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cic-gpt2 train: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
def test_resume_onto_another_prepared_dataset_is_refused(four_steps, tmp_path, capsys):
    """The same CSV prepared with --seed 1: same classes and sizes, other rows in each split."""
    other = tmp_path / "seed1"
    assert run_cli("prepare", SAMPLE_V2, "--output", other, "--classes", "8", "--seed", "1") == 0
    capsys.readouterr()
    tag = four_steps / "checkpoints" / "step-000002"
    assert train_here("--data", other, "--run-dir", tmp_path / "r", "--resume", tag, *COMMON) == 2
    line = _error(capsys)
    assert f"checkpoint {tag} (step 2) was trained on another prepared dataset" in line
    assert "split.seed 0 -> 1" in line and "start a new --run-dir" in line


@pytest.mark.slow
def test_resume_with_another_seed_is_refused(four_steps, prepared_v2, tmp_path, capsys):
    tag = four_steps / "checkpoints" / "step-000002"
    args = [a for a in COMMON if not a.startswith("train.seed=")] + ["train.seed=8"]
    assert train_here("--data", prepared_v2, "--run-dir", tmp_path / "r", "--resume", tag, *args) == 2
    line = _error(capsys)
    assert "train.seed 7, this run has 8" in line and "set train.seed=7" in line


@pytest.mark.slow
def test_a_changed_grad_clip_is_applied_on_resume_and_said(four_steps, prepared_v2, tmp_path):
    """DeepSpeed's ZeRO optimizer would restore clip_grad 1.0 from the checkpoint; the resumed run clips at 0.5
    (read back from the optimizer state it saves at the end)."""
    run_dir = tmp_path / "r"
    tag = four_steps / "checkpoints" / "step-000002"
    proc = train_single("--data", prepared_v2, "--run-dir", run_dir, "--resume", tag, *COMMON, "train.grad_clip=0.5")
    assert "train.grad_clip 1.0 -> 0.5: the resumed run clips at 0.5" in proc.stdout, proc.stdout[-2000:]
    optim = next((run_dir / "checkpoints" / "step-000004").glob("*optim_states.pt"))
    state = torch.load(optim, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    assert state["clip_grad"] == 0.5
    saved = torch.load(next((tag).glob("*optim_states.pt")), map_location="cpu", weights_only=False)
    assert saved["optimizer_state_dict"]["clip_grad"] == 1.0


@pytest.mark.slow
def test_new_ranks_of_a_universal_resume_get_their_own_rng_streams(prepared_v2, tmp_path):
    """1 rank -> 4 ranks (global batch 4 kept): ranks 1-3 have no saved RNG file. Each must get its own stream
    (seed, rank, step), not the shared init seed's state -- read back from the RNG files the resumed run saves."""
    run_dir = tmp_path / "grow"
    args = COMMON  # 4 steps, a checkpoint every 2
    train_single("--data", prepared_v2, "--run-dir", run_dir, *args, "train.micro_batch_size=4")
    tag = run_dir / "checkpoints" / "step-000002"
    assert sorted(p.name for p in tag.glob("rng_state_rank*.pt")) == ["rng_state_rank0.pt"]
    other = tmp_path / "grown"
    torchrun(4, "--data", prepared_v2, "--run-dir", other, "--resume", tag, *args, "train.micro_batch_size=1",
             timeout=600)
    saved = other / "checkpoints" / "step-000004"
    states = [torch.load(saved / f"rng_state_rank{r}.pt", weights_only=True)["torch"] for r in range(4)]
    for i in range(4):
        for j in range(i):
            assert not torch.equal(states[i], states[j]), (i, j)
