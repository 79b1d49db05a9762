"""Progress into a log file: plain periodic lines, never `\\r` redraws (cic_gpt2/progress.py), checked on
real `cic-gpt2 prepare` and `cic-gpt2 train` runs whose stdout and stderr go to a file."""
import io
import os
import subprocess
import sys

import pytest

from cic_gpt2 import progress
from cic_gpt2.errors import CicError
from conftest import SAMPLE_V2, run_proc
from test_train import RANK_VARS

STEPS = 6


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def plain_env(monkeypatch):
    for key in (progress.ENV_FORCE, "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(progress.ENV_EVERY_S, "0")


def test_bars_only_on_a_terminal_outside_slurm_unless_forced(plain_env, monkeypatch):
    assert progress.interactive(FakeTTY()) and not progress.interactive(io.StringIO())
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert not progress.interactive(FakeTTY())
    monkeypatch.setenv(progress.ENV_FORCE, "1")
    assert progress.interactive(io.StringIO())
    monkeypatch.setenv(progress.ENV_FORCE, "0")
    monkeypatch.delenv("SLURM_JOB_ID")
    assert not progress.interactive(FakeTTY())


def test_plain_progress_writes_whole_lines_with_count_percent_and_postfix(plain_env):
    out = io.StringIO()
    with progress.bar(total=10, initial=2, desc="train", unit="step", dynamic_ncols=True, file=out) as bar:
        assert isinstance(bar, progress.PlainProgress)
        bar.update(1)
        bar.set_postfix(loss="1.2345", refresh=False)
        bar.update(7)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("train: 3/10 step (30%), ") and lines[1].startswith("train: 10/10 step (100%), ")
    assert lines[1].endswith("loss=1.2345") and len(lines) == 2  # close() does not repeat the last count
    rows = io.StringIO()
    for _ in progress.bar(range(3), desc="baselines", unit="model", file=rows):
        pass
    assert rows.getvalue().splitlines()[-1].startswith("baselines: 3/3 model (100%)")


def test_periodic_lines_are_spaced_by_the_interval(plain_env, monkeypatch):
    monkeypatch.setenv(progress.ENV_EVERY_S, "3600")
    out = io.StringIO()
    with progress.bar(unit=" rows", unit_scale=True, desc="prepare", file=out) as bar:
        for _ in range(100):
            bar.update(1000)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]  # only the final line
    assert out.getvalue().startswith("prepare: 100k rows, ")


def test_forced_or_disabled_bars_are_tqdm(plain_env, monkeypatch):
    from tqdm import tqdm

    silent = io.StringIO()
    with progress.bar(total=3, desc="x", file=silent, disable=True) as bar:
        bar.update(3)
    assert isinstance(bar, tqdm) and silent.getvalue() == ""
    monkeypatch.setenv(progress.ENV_FORCE, "1")
    forced = io.StringIO()
    with progress.bar(total=3, desc="x", file=forced, disable=False) as bar:  # explicit: TQDM_DISABLE may be set
        bar.update(3)
    assert isinstance(bar, tqdm) and "\r" in forced.getvalue()


def test_a_bad_interval_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(progress.ENV_EVERY_S, "soon")
    with pytest.raises(CicError, match="CIC_GPT2_PROGRESS_EVERY_S='soon' must be a number of seconds"):
        progress.bar(total=1, file=io.StringIO())


def _logged_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in RANK_VARS + ("SLURM_JOB_ID", progress.ENV_FORCE, "HF_HUB_DISABLE_PROGRESS_BARS",
                                    "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}
    return {**env, progress.ENV_EVERY_S: "0", **extra}


def _run_into_log(tmp_path, name: str, argv: list, env: dict, timeout: float) -> bytes:
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as f:
        proc = run_proc([sys.executable, "-m", "cic_gpt2", *map(str, argv)], env=env, stdout=f,
                        stderr=subprocess.STDOUT, capture_output=False, text=False, timeout=timeout)
    data = log.read_bytes()
    assert proc.returncode == 0, data[-3000:].decode(errors="replace")
    return data


def test_library_bars_are_off_when_not_on_a_terminal(tmp_path):
    code = ("from cic_gpt2.progress import quiet_library_bars; quiet_library_bars(); "
            "import transformers.utils.logging as t, datasets, huggingface_hub.utils as h; "
            "print(t.is_progress_bar_enabled(), datasets.is_progress_bar_enabled(), h.are_progress_bars_disabled())")
    for forced, expected in ((None, "False False True"), ("1", "True True False")):
        env = _logged_env(**({progress.ENV_FORCE: forced} if forced else {}))
        with open(tmp_path / "out", "wb") as f:
            proc = run_proc([sys.executable, "-c", code], env=env, stdout=f, stderr=subprocess.DEVNULL,
                            capture_output=False, text=False, timeout=300)
        assert proc.returncode == 0 and (tmp_path / "out").read_text().split() == expected.split(), forced


def test_prepare_and_train_logs_into_a_file_hold_no_carriage_return(tmp_path):
    prepared = tmp_path / "prepared"
    log = _run_into_log(tmp_path, "prepare", ["prepare", SAMPLE_V2, "--output", prepared, "--classes", "8",
                                              "--chunk-rows", "1000", "--workers", "1"], _logged_env(), 300)
    assert b"\r" not in log, log[:2000]
    assert len([line for line in log.splitlines() if line.startswith(b"prepare: ")]) >= 2, log.decode()

    log = _run_into_log(tmp_path, "train", [
        "train", "--data", prepared, "--run-dir", tmp_path / "run", "model.name=tiny", f"train.max_steps={STEPS}",
        "train.warmup_steps=1", "log.log_every=2", "log.tensorboard=false", "train.eval_micro_batch_size=16",
    ], _logged_env(), 600)
    assert b"\r" not in log, log[-3000:]
    lines = [line for line in log.splitlines() if line.startswith(b"train: ")]
    assert [line.split(b" ")[1] for line in lines] == [f"{n}/{STEPS}".encode() for n in range(1, STEPS + 1)], log
    assert b"loss=" in lines[-1] and b"Writing model shards" not in log
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()  # the export (and its shard writer) ran
