"""`cic-gpt2 check` on 2 real gloo ranks (RANK/WORLD_SIZE as torchrun sets them): a healthy job passes with
one table; a node-local run dir, a node without the data, or an unwritable run dir fails EVERY rank (exit 1)
with the cell that says why."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cic_gpt2.files import free_port
from conftest import wait_all

TIMEOUT_S = 240


def check_two_ranks(tmp_path: Path, per_rank_args) -> tuple[list[int], list[str]]:
    port = str(free_port())
    procs, logs = [], []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        log = tmp_path / f"check.rank{rank}.log"
        logs.append(log)
        with open(log, "w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "cic_gpt2", "check", *per_rank_args(rank),
                                           "model.name=tiny", "dist.timeout_s=60"],
                                          env=env, stdout=out, stderr=subprocess.STDOUT))
    codes = wait_all(procs, TIMEOUT_S)
    return codes, [p.read_text(errors="replace") for p in logs]


@pytest.mark.slow
def test_healthy_two_rank_job_passes_with_one_table(prepared_v2, tmp_path):
    run_dir = tmp_path / "run"
    codes, (out0, out1) = check_two_ranks(
        tmp_path, lambda r: ["--data", str(prepared_v2), "--run-dir", str(run_dir), "--gpu-mem", "16"])
    assert codes == [0, 0], out0 + out1
    assert "| rank | host | device | inputs | run dir | ops | all-reduce | shared |" in out0
    assert "| 0 |" in out0 and "| 1 |" in out0 and "FAIL" not in out0
    assert "ok: gloo" in out0 and "shared by all 2 ranks" in out0 and "4,050 rows" in out0
    assert "memory plan: tiny, ZeRO-2" in out0 and "fits 16 GiB" in out0 and "all checks passed" in out0
    assert "| rank |" not in out1  # rank 0 prints
    assert not list(run_dir.glob(".check-*/rank*")), "probe files are cleaned up"


@pytest.mark.slow
def test_a_run_dir_one_node_does_not_share_fails_every_rank(prepared_v2, tmp_path):
    """Rank 1's run dir is another directory (as a node-local /tmp or an unmounted path would be)."""
    codes, (out0, out1) = check_two_ranks(
        tmp_path, lambda r: ["--data", str(prepared_v2), "--run-dir", str(tmp_path / f"run{r}")])
    assert codes == [1, 1], out0 + out1
    assert "FAIL: RuntimeError: run dir not shared: this rank does not see the files of rank(s) [1]" in out0
    assert "rank(s) [0]" in out0 and "FAILED" in out0


@pytest.mark.slow
def test_missing_data_on_one_rank_and_an_unwritable_run_dir_are_reported(prepared_v2, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    codes, (out0, out1) = check_two_ranks(
        tmp_path, lambda r: ["--data", str(prepared_v2 if r == 0 else tmp_path / "absent"),
                             "--run-dir", str(blocker / "run")])
    assert codes == [1, 1], out0 + out1
    rows = {line.split("|")[1].strip(): line for line in out0.splitlines() if line.startswith("| 0 |") or
            line.startswith("| 1 |")}
    assert "ok: " in rows["0"].split("|")[4] and "FAIL: " in rows["1"].split("|")[4], rows  # inputs column
    assert str(tmp_path / "absent") in rows["1"]
    assert "is not writable" in rows["0"] and "is a file, not a directory" in rows["0"]
