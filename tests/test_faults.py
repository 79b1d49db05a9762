"""Faults on CPU with real processes: a rank killed mid-training, a checkpoint cut off mid-write, an unwritable
or full run dir, config errors before any process group, the fp16 overflow guard.

Multi-process runs start each rank as its own `python -m cic_gpt2 train` with the torchrun variables (RANK,
WORLD_SIZE, MASTER_ADDR/PORT), as srun starts one task per GPU: no elastic agent tears the job down for us,
so what a surviving rank does is the code's own behaviour (gloo, `dist.timeout_s`). The tiny GPT-2 trains
on the bundled real rows (conftest's `prepared_v2`).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cic_gpt2.files import free_port
from cic_gpt2 import checkpoint as ckpt
from cic_gpt2 import preflight
from cic_gpt2.config import ModelConfig, RunConfig, load_config
from cic_gpt2.errors import CicError, ConfigError
import conftest
from conftest import run_cli, run_proc

REPO = Path(__file__).resolve().parent.parent
MAX_STEPS = 16
SAVE_EVERY = 4
TIMEOUT_S = 20  # dist.timeout_s of the killed runs: a dead peer must surface within this (+ start-up slack)
TRAIN_ARGS = [
    "model.name=tiny", f"train.max_steps={MAX_STEPS}", "train.micro_batch_size=4", "train.warmup_steps=2",
    "train.eval_micro_batch_size=64", "log.log_every=1", "log.progress=false", "log.tensorboard=false",
    f"checkpoint.every_steps={SAVE_EVERY}", "checkpoint.keep_last=2", "checkpoint.export=false",
]
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
RUN_TIMEOUT_S = 240

# Runs `cic-gpt2 train`; with CIC_TEST_KILL_BEFORE_MARKER=N this rank SIGKILLs itself at the exact worst moment of
# the save of step N: every rank's files are on disk (and DeepSpeed's `latest` names the tag), the COMPLETE
# marker is not. A test-only wrapper: the package has no fault-injection switch.
RANK_MAIN = """
import os, signal, sys
kill_step = os.environ.get("CIC_TEST_KILL_BEFORE_MARKER")
if kill_step:
    from cic_gpt2 import checkpoint
    real_write = checkpoint.write_text
    def write(path, text):
        if path.name == checkpoint.COMPLETE_MARKER and path.parent.name == checkpoint.tag_for(int(kill_step)):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(path, text)
    checkpoint.write_text = write
if os.environ.get("CIC_TEST_PRUNE_QUOTA"):  # this rank's pruning hits a disk quota, as on a full /scratch
    import errno
    from cic_gpt2 import checkpoint
    def prune(ckpt_dir, *args, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(ckpt_dir))
    checkpoint.prune = prune
if os.environ.get("CIC_TEST_HIDE_STEP"):  # this rank's listing misses a checkpoint (a stale Lustre/NFS cache)
    from cic_gpt2 import checkpoint
    real_list = checkpoint.list_checkpoints
    hidden = checkpoint.tag_for(int(os.environ["CIC_TEST_HIDE_STEP"]))
    checkpoint.list_checkpoints = lambda d: [c for c in real_list(d) if c[1].name != hidden]
converter = os.environ.get("CIC_TEST_CONVERTER")
if converter:  # this rank's universal conversion fails ("fail") or starts late ("slow:S", S seconds)
    from cic_gpt2 import universal
    real_command = universal.converter_command
    def command(tag_dir, output, workers):
        if converter == "fail":
            return [sys.executable, "-c", "print('ValueError: injected converter failure'); raise SystemExit(3)"]
        # sleeps S s, unless its parent (rank 0) dies first: then it exits and converts nothing
        late = ("import os, subprocess, sys, time\\nparent, end = os.getppid(), time.time() + %s\\n"
                "while time.time() < end and os.getppid() == parent: time.sleep(0.2)\\n"
                "sys.exit(subprocess.call(sys.argv[1:]) if os.getppid() == parent else 1)" % converter.split(":")[1])
        return [sys.executable, "-c", late, *real_command(tag_dir, output, workers)]
    universal.converter_command = command
args = sys.argv[1:]
if os.environ.get("CIC_TEST_RUN_DIR"):  # this rank's run dir is another directory (node-local disk)
    args[args.index("--run-dir") + 1] = os.environ["CIC_TEST_RUN_DIR"]
from cic_gpt2.cli import main
raise SystemExit(main(["train", *args]))
"""



def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "OMPI_"))}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra)
    return env


def start_ranks(run_dir: Path, data: Path, *extra: str, world_size: int = 2, timeout_s: int = TIMEOUT_S,
                rank_env: dict[int, dict] | None = None) -> list[subprocess.Popen]:
    """One `python -m cic_gpt2 train` per rank, torchrun variables only; output in RUN_DIR.rankN.log."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, **(rank_env or {}).get(rank, {}))
        with open(f"{run_dir}.rank{rank}.log", "a") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", RANK_MAIN, "--data", str(data), "--run-dir", str(run_dir), *TRAIN_ARGS,
                 f"dist.timeout_s={timeout_s}", *extra],
                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = RUN_TIMEOUT_S) -> list[int]:
    return conftest.wait_all(procs, timeout)


def logs(run_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-4000:]
                     for p in sorted(run_dir.parent.glob(f"{run_dir.name}.rank*.log")))


def final_weights(run_dir: Path) -> dict:
    tag_dir = ckpt.latest_complete(run_dir / "checkpoints")
    assert tag_dir is not None, f"no complete checkpoint in {run_dir}"
    # Our own test reads DeepSpeed's pickle (optimizer metadata inside): trusted, written by this test.
    return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def assert_same_final_weights(run_dir: Path, reference: Path) -> None:
    got, want = final_weights(run_dir), final_weights(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-6), name
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["step"] == MAX_STEPS and summary["world_size"] == 2


@pytest.fixture(scope="module")
def reference_run(prepared_v2, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run the interrupted ones must reproduce."""
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    codes = wait_all(start_ranks(run_dir, prepared_v2))
    assert codes == [0, 0], logs(run_dir)
    return run_dir


# --------------------------------------------------------------------------------------------------
# A rank dies
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_one_rank_survivor_exits_within_the_timeout_and_resume_matches(reference_run, prepared_v2, tmp_path):
    """SIGKILL rank 1 once the first checkpoint is complete: rank 0 does not hang, it exits with an error
    naming the lost peer within dist.timeout_s; the same command with --resume auto continues from the last
    complete checkpoint and ends with the uninterrupted run's weights."""
    run_dir = tmp_path / "killed"
    procs = start_ranks(run_dir, prepared_v2, "--resume", "auto")
    try:
        _wait_for(run_dir / "checkpoints" / ckpt.tag_for(SAVE_EVERY) / ckpt.COMPLETE_MARKER, procs, run_dir)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        survivor_code = procs[0].wait(timeout=TIMEOUT_S + 40)
        survivor_s = time.monotonic() - killed_at
        print(f"survivor exited {survivor_s:.1f} s after its peer was killed")
    finally:
        codes = wait_all(procs, timeout=5)
    assert codes[1] == -signal.SIGKILL
    assert survivor_code not in (0, None), logs(run_dir)
    assert survivor_s < TIMEOUT_S + 30, f"survivor took {survivor_s:.0f} s after its peer died"
    survivor_log = (tmp_path / "killed.rank0.log").read_text(errors="replace")
    assert any(s in survivor_log for s in ("Connection closed by peer", "Connection reset by peer", "timed out",
                                           "Timed out", "DistBackendError", "lost")), survivor_log[-3000:]
    # one line naming what happened and the resume command, not a gloo traceback
    assert "cic-gpt2 train: error: rank 0 lost a peer rank in a collective" in survivor_log, survivor_log[-3000:]
    assert "--resume auto" in survivor_log and "Traceback" not in survivor_log, survivor_log[-3000:]
    saved = [(step, ok) for step, _, ok in ckpt.list_checkpoints(run_dir / "checkpoints")]
    last_complete = max(step for step, ok in saved if ok)
    assert SAVE_EVERY <= last_complete < MAX_STEPS, saved

    codes = wait_all(start_ranks(run_dir, prepared_v2, "--resume", "auto"))
    assert codes == [0, 0], logs(run_dir)
    resumed_from = run_dir / "checkpoints" / ckpt.tag_for(last_complete)
    assert f"resumed from {resumed_from} at step {last_complete}" in logs(run_dir)
    assert_same_final_weights(run_dir, reference_run)


def _wait_for(path: Path, procs: list[subprocess.Popen], run_dir: Path) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not path.exists():
        assert all(p.poll() is None for p in procs), logs(run_dir)
        assert time.monotonic() < deadline, logs(run_dir)
        time.sleep(0.005)


@pytest.mark.slow
def test_frozen_rank_survivor_errors_after_the_collective_timeout(prepared_v2, tmp_path):
    """A peer that hangs instead of dying (SIGSTOP: its sockets stay open, as with a wedged node or a network
    partition) is found by the collective timeout alone: rank 0 errors out after dist.timeout_s, not never."""
    timeout_s = 10
    run_dir = tmp_path / "frozen"
    procs = start_ranks(run_dir, prepared_v2, timeout_s=timeout_s)
    try:
        _wait_for(run_dir / "checkpoints" / ckpt.tag_for(SAVE_EVERY) / ckpt.COMPLETE_MARKER, procs, run_dir)
        procs[1].send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        survivor_code = procs[0].wait(timeout=timeout_s + 25)
        survivor_s = time.monotonic() - frozen_at
        print(f"survivor exited {survivor_s:.1f} s after its peer froze (dist.timeout_s={timeout_s})")
    finally:
        procs[1].send_signal(signal.SIGKILL)
        wait_all(procs, timeout=10)
    assert survivor_code != 0, logs(run_dir)
    assert timeout_s * 0.5 <= survivor_s < timeout_s + 25, survivor_s
    survivor_log = (tmp_path / "frozen.rank0.log").read_text(errors="replace")
    assert "timed out" in survivor_log.lower() or "timeout" in survivor_log.lower(), survivor_log[-3000:]
    assert "lost a peer rank in a collective" in survivor_log and "Traceback" not in survivor_log, survivor_log[-3000:]


@pytest.mark.slow
def test_kill_during_checkpoint_write_is_never_resumed_from(reference_run, prepared_v2, tmp_path):
    """Rank 0 is SIGKILLed while saving step 8: every shard of step-000008 is on disk and DeepSpeed's `latest`
    names it, but the COMPLETE marker was never written. Rank 1 (waiting in the save's last barrier) exits
    with an error instead of hanging; `--resume auto` ignores step 8 and resumes from step 4; the result
    equals the uninterrupted run."""
    run_dir = tmp_path / "cut"
    partial_step = 2 * SAVE_EVERY
    procs = start_ranks(run_dir, prepared_v2, "--resume", "auto",
                        rank_env={0: {"CIC_TEST_KILL_BEFORE_MARKER": str(partial_step)}})
    start = time.monotonic()
    codes = wait_all(procs)
    assert codes[0] == -signal.SIGKILL and codes[1] not in (0, None), (codes, logs(run_dir))
    assert time.monotonic() - start < RUN_TIMEOUT_S
    ckpt_dir = run_dir / "checkpoints"
    partial = ckpt_dir / ckpt.tag_for(partial_step)
    assert partial.is_dir() and not ckpt.is_complete(partial)
    assert (partial / "mp_rank_00_model_states.pt").is_file(), "the save really was under way"
    assert (ckpt_dir / "latest").read_text().strip() == partial.name, "DeepSpeed's own pointer names the partial save"
    assert ckpt.latest_complete(ckpt_dir) == ckpt_dir / ckpt.tag_for(SAVE_EVERY)
    assert ckpt.resolve_resume("auto", run_dir) == ckpt_dir / ckpt.tag_for(SAVE_EVERY)
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(partial), run_dir)

    codes = wait_all(start_ranks(run_dir, prepared_v2, "--resume", "auto"))
    assert codes == [0, 0], logs(run_dir)
    assert f"resumed from {ckpt_dir / ckpt.tag_for(SAVE_EVERY)} at step {SAVE_EVERY}" in logs(run_dir)
    # step 8 was saved again (replacing the partial files), then pruned like any complete one (keep_last=2)
    assert [(step, ok) for step, _, ok in ckpt.list_checkpoints(ckpt_dir)] == [(MAX_STEPS - SAVE_EVERY, True),
                                                                           (MAX_STEPS, True)]
    assert_same_final_weights(run_dir, reference_run)

    # The estimate preflight refuses runs with is a real checkpoint's size (tiny model, fp32, 2 ranks).
    n_params = preflight.param_count_for(ModelConfig(name="tiny"), json.loads(
        (prepared_v2 / "manifest.json").read_text())["label_names"])
    estimate = preflight.estimate_checkpoint(n_params, 2, "fp32", export=False)
    real = sum(f.stat().st_size for f in (ckpt_dir / ckpt.tag_for(MAX_STEPS)).rglob("*") if f.is_file())
    assert 0.95 * estimate.checkpoint_bytes < real < estimate.needed_bytes, (real, estimate)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "unreadable"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference_run, prepared_v2, tmp_path, damage):
    """The newest complete checkpoint lost bytes after its COMPLETE marker was written (a node crash before
    the page cache reached Lustre; a bad disk): `truncated` cuts rank 1's optimizer shard in half (its size no
    longer matches the marker's), `unreadable` zeroes its last 4 KiB (same size: torch cannot load it).
    `--resume auto` warns, naming the file, resumes from the previous complete checkpoint and ends with the
    uninterrupted run's weights."""
    run_dir = tmp_path / damage
    shutil.copytree(reference_run, run_dir)
    ckpt_dir = run_dir / "checkpoints"
    newest, previous = ckpt_dir / ckpt.tag_for(MAX_STEPS), ckpt_dir / ckpt.tag_for(MAX_STEPS - SAVE_EVERY)
    assert ckpt.is_complete(newest) and ckpt.is_complete(previous)
    assert set(ckpt.read_marker(newest)["files"]) >= {"rng_state_rank1.pt", "run_config.yaml"}
    shard = newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        if damage == "truncated":
            f.truncate(size // 2)
        else:
            f.seek(size - 4096)
            f.write(bytes(4096))
    codes = wait_all(start_ranks(run_dir, prepared_v2, "--resume", "auto"))
    out = logs(run_dir)
    assert codes == [0, 0], out
    assert f"warning: checkpoint {newest} " in out and f"previous complete checkpoint {previous}" in out, out
    assert str(shard) in out and (damage == "truncated" or "failed to load on rank 1" in out), out
    assert f"resumed from {previous} at step {MAX_STEPS - SAVE_EVERY}" in out, out
    assert ckpt.verify(newest) is None, "the step was saved again"
    assert_same_final_weights(run_dir, reference_run)


@pytest.mark.slow
def test_rank0_only_write_failure_is_the_same_error_on_every_rank_at_once(prepared_v2, tmp_path):
    """Rank 0's pruning of old checkpoints raises OSError (disk quota) between two collectives, on rank 0
    alone: both ranks exit 2 with the same one line naming the checkpoint, at once, long before the 600 s
    collective timeout (rank 1 hears it through the broadcast that ends the rank-0 section)."""
    run_dir = tmp_path / "quota"
    procs = start_ranks(run_dir, prepared_v2, timeout_s=600, rank_env={0: {"CIC_TEST_PRUNE_QUOTA": "1"}})
    codes = wait_all(procs, timeout=RUN_TIMEOUT_S)  # a rank waiting out the 600 s timeout fails here
    assert codes == [2, 2], (codes, logs(run_dir))
    tag_dir = run_dir / "checkpoints" / ckpt.tag_for(SAVE_EVERY)
    for rank in (0, 1):
        log = (tmp_path / f"quota.rank{rank}.log").read_text(errors="replace")
        line = f"cic-gpt2 train: error: completing checkpoint {tag_dir} (side files, COMPLETE, pruning old ones) " \
               f"failed on rank 0: [Errno {errno.EDQUOT}] Disk quota exceeded"
        assert line in log and "Traceback" not in log, log[-3000:]


@pytest.mark.slow
def test_ranks_that_see_different_run_dirs_or_tags_fail_together(reference_run, prepared_v2, tmp_path):
    """Each rank resolves --resume auto from its own listing. (1) Rank 1's run dir is another directory (as a
    node-local /tmp of the same path on another node; test hook CIC_TEST_RUN_DIR): both ranks exit 2 saying the
    run dir is not shared. (2) Rank 1's listing misses the newest checkpoint (a stale cache; test hook
    CIC_TEST_HIDE_STEP filters it out of rank 1's list_checkpoints): both exit 2 naming each rank's step."""
    run_dir = tmp_path / "local"
    codes = wait_all(start_ranks(run_dir, prepared_v2, timeout_s=600,
                                 rank_env={1: {"CIC_TEST_RUN_DIR": str(tmp_path / "other-node")}}))
    assert codes == [2, 2], (codes, logs(run_dir))
    for rank in (0, 1):
        log = (tmp_path / f"local.rank{rank}.log").read_text(errors="replace")
        assert f"error: run dir {run_dir} is not shared across nodes: rank(s) 1 do not see" in log, log[-3000:]
        assert "must be on a filesystem every node mounts" in log and "Traceback" not in log, log[-3000:]

    run_dir = tmp_path / "stale"
    shutil.copytree(reference_run, run_dir)
    codes = wait_all(start_ranks(run_dir, prepared_v2, "--resume", "auto", timeout_s=600,
                                 rank_env={1: {"CIC_TEST_HIDE_STEP": str(MAX_STEPS)}}))
    assert codes == [2, 2], (codes, logs(run_dir))
    for rank in (0, 1):
        log = (tmp_path / f"stale.rank{rank}.log").read_text(errors="replace")
        assert "error: the ranks disagree on the checkpoint to resume from" in log, log[-3000:]
        assert f"rank 0: step {MAX_STEPS}; rank 1: step {MAX_STEPS - SAVE_EVERY}" in log, log[-3000:]


# --------------------------------------------------------------------------------------------------
# Resharding: rank 0 converts to DeepSpeed's universal format while the others wait (#13 item 2)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_rank_run(prepared_v2, tmp_path_factory) -> Path:
    """A 1-process run with the 2-rank runs' global batch (micro 4 x accumulation 2): its checkpoints resume
    on 2 ranks only through a universal conversion."""
    run_dir = tmp_path_factory.mktemp("universal") / "one_rank"
    codes = wait_all(start_ranks(run_dir, prepared_v2, "train.grad_accum=2", world_size=1))
    assert codes == [0], logs(run_dir)
    return run_dir


def _resharded_copy(one_rank_run: Path, tmp_path: Path) -> Path:
    """A copy of the 1-rank run's step-12 checkpoint (keep_last=2 keeps 12 and 16; each test converts its own)."""
    step = MAX_STEPS - SAVE_EVERY
    tag = tmp_path / "saved" / ckpt.tag_for(step)
    shutil.copytree(one_rank_run / "checkpoints" / ckpt.tag_for(step), tag)
    return tag


@pytest.mark.slow
def test_a_universal_conversion_slower_than_the_collective_timeout_does_not_fail_the_waiting_rank(
        one_rank_run, prepared_v2, tmp_path):
    """Rank 0's conversion takes > 2 x dist.timeout_s (20 s; the converter starts 45 s late). Rank 1 waits on
    rank 0's status file, in no collective, so both ranks finish the resharded run. Before: rank 1 waited in a
    broadcast bounded by the timeout and failed after 20 s."""
    tag, run_dir = _resharded_copy(one_rank_run, tmp_path), tmp_path / "resumed"
    start = time.monotonic()
    codes = wait_all(start_ranks(run_dir, prepared_v2, "--resume", str(tag),
                                 rank_env={0: {"CIC_TEST_CONVERTER": "slow:45"}}))
    assert codes == [0, 0], logs(run_dir)
    assert time.monotonic() - start > 45 + TIMEOUT_S / 2
    assert "resharded via a universal checkpoint" in logs(run_dir)
    assert ckpt.is_complete(tag / "universal")
    status = json.loads((tag / ".universal.status.json").read_text())
    assert status["state"] == "done" and status["beat"] >= 45 // 5, status  # rank 0 kept beating meanwhile
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == MAX_STEPS


@pytest.mark.slow
def test_a_failing_universal_conversion_fails_every_rank_at_once_with_its_line(one_rank_run, prepared_v2,
                                                                                tmp_path):
    """The converter exits 3 on rank 0: both ranks exit 2 with the same line (the converter's last line, the
    log path, the advice), long before the 600 s collective timeout."""
    tag, run_dir = _resharded_copy(one_rank_run, tmp_path), tmp_path / "resumed"
    procs = start_ranks(run_dir, prepared_v2, "--resume", str(tag), timeout_s=600,
                        rank_env={0: {"CIC_TEST_CONVERTER": "fail"}})
    assert wait_all(procs) == [2, 2], logs(run_dir)
    line = (f"cic-gpt2 train: error: converting {tag} (written by 1 ranks) to a universal checkpoint failed (exit 3): "
            f"ValueError: injected converter failure (log: {tag / '.universal.log'}). Resume with 1 processes instead")
    for rank in (0, 1):
        log = (tmp_path / f"resumed.rank{rank}.log").read_text(errors="replace")
        assert line in log and "Traceback" not in log, log[-3000:]
    assert not (tag / "universal").exists()


@pytest.mark.slow
def test_a_rank_0_killed_mid_conversion_fails_the_waiting_rank_after_the_timeout(one_rank_run, prepared_v2,
                                                                                 tmp_path):
    """SIGKILL rank 0 while it converts: no `failed` status is ever written; rank 1 sees the heartbeat stop and
    exits 2 after dist.timeout_s (20 s) naming rank 0 and the ways out, instead of waiting forever."""
    tag, run_dir = _resharded_copy(one_rank_run, tmp_path), tmp_path / "resumed"
    procs = start_ranks(run_dir, prepared_v2, "--resume", str(tag), rank_env={0: {"CIC_TEST_CONVERTER": "slow:600"}})
    status = tag / ".universal.status.json"
    try:
        _wait_for(status, procs, run_dir)
        procs[0].kill()
        killed = time.monotonic()
        assert procs[1].wait(timeout=TIMEOUT_S + 60) == 2, logs(run_dir)
        assert time.monotonic() - killed >= TIMEOUT_S - 6  # the last beat may be up to HEARTBEAT_S old
    finally:
        wait_all(procs, timeout=5)
    log = (tmp_path / "resumed.rank1.log").read_text(errors="replace")
    assert f"cic-gpt2 train: error: rank 0 stopped converting {tag} to a universal checkpoint: the last heartbeat" \
           in log and "rank 0 killed or its node lost?" in log and f"`cic-gpt2 convert {tag}`" in log, log[-3000:]
    assert "Traceback" not in log and json.loads(status.read_text())["state"] == "running"


@pytest.mark.slow
def test_offline_convert_is_used_by_the_resharded_resume(one_rank_run, prepared_v2, tmp_path):
    """`cic-gpt2 convert` before the job; the 2-rank resume then converts nothing (its converter would fail)."""
    tag, run_dir = _resharded_copy(one_rank_run, tmp_path), tmp_path / "resumed"
    proc = run_proc([sys.executable, "-m", "cic_gpt2", "convert", str(tag.parent), "--workers", "2"],
                    timeout=RUN_TIMEOUT_S, env=_env(), cwd=REPO)
    assert proc.returncode == 0 and f"wrote {tag / 'universal'}" in proc.stdout, proc.stdout + proc.stderr
    assert ckpt.is_complete(tag / "universal")
    codes = wait_all(start_ranks(run_dir, prepared_v2, "--resume", str(tag),
                                 rank_env={0: {"CIC_TEST_CONVERTER": "fail"}}))
    assert codes == [0, 0], logs(run_dir)
    assert "resharded via a universal checkpoint" in logs(run_dir)


# --------------------------------------------------------------------------------------------------
# Refused before training starts: run dir, free space, batch arithmetic
# --------------------------------------------------------------------------------------------------
def test_param_count_estimate_equals_the_built_model():
    from cic_gpt2.model import build_model, load_model_tokenizer

    labels = ["Benign", "DDoS", "Mirai"]
    for head in ("seqcls", "causal-lm"):
        cfg = ModelConfig(name="tiny", head=head)
        built = sum(p.numel() for p in build_model(cfg, labels, load_model_tokenizer(cfg)).parameters())
        assert preflight.param_count_for(cfg, labels) == built, head


def test_checkpoint_estimate_arithmetic():
    e = preflight.estimate_checkpoint(1_000_000, world_size=4, precision="fp16", export=True)
    assert e.checkpoint_bytes == 14_000_000 and e.export_bytes == 4_000_000
    assert e.needed_bytes == int(18_000_000 * 1.1) + (64 << 20)
    assert preflight.estimate_checkpoint(1_000_000, 1, "fp32", export=False).checkpoint_bytes == 16_000_000


def test_run_dir_under_a_regular_file_is_refused(tmp_path):
    """Portable (any user, root included): a path below a regular file can never be created."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(CicError) as e:
        preflight.check_run_dir(blocker / "run", 3_000_000, 2)
    assert f"run dir {blocker / 'run'} is not writable" in str(e.value) and "is a file" in str(e.value)


def test_unwritable_permissions_are_refused(tmp_path):
    """chmod 0500. Root ignores permission bits, so as root this says so and skips (see the mount test)."""
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 0500 does not deny root's writes (read-only mount test covers it)")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(CicError, match="not writable"):
        preflight.check_run_dir(locked / "run", 3_000_000, 1)


@pytest.fixture
def tmpfs(tmp_path):
    """A real tiny tmpfs (needs mount privileges: root in a container that allows it; else skip)."""
    mounts = []

    def mount(size: str, read_only: bool = False) -> Path:
        point = tmp_path / f"tmpfs{len(mounts)}"
        point.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", str(point)], check=True)


def test_read_only_filesystem_is_refused(tmpfs):
    point = tmpfs("1m", read_only=True)
    with pytest.raises(OSError) as raw:
        (point / "x").write_text("x")
    assert raw.value.errno == errno.EROFS, "the mount really is read-only, even for root"
    with pytest.raises(CicError, match="not writable .read-only filesystem"):
        preflight.check_run_dir(point / "run", 3_000_000, 1)


def test_too_little_free_space_on_a_real_small_filesystem(tmpfs):
    point = tmpfs("8m")
    with pytest.raises(CicError) as e:
        preflight.check_run_dir(point / "run", 3_382_272, 2, "fp32", keep_last=2)
    msg = str(e.value)
    assert f"in {point / 'run'}" in msg and "needs ~" in msg and "free" in msg and "3,382,272 parameters" in msg
    assert "0.01 GiB free" in msg, "the real filesystem's free space (8 MiB)"


def test_too_little_free_space_names_needed_and_free(tmp_path):
    fake_free = 123 << 20

    def disk_usage(path):
        assert Path(path) == tmp_path / "run", "measured on the run dir itself (created by the write check)"
        return SimpleNamespace(total=1 << 40, used=0, free=fake_free)

    n = 124_439_808  # GPT-2 small
    with pytest.raises(CicError) as e:
        preflight.check_run_dir(tmp_path / "run", n, 4, "fp16", keep_last=2, disk_usage=disk_usage)
    estimate = preflight.estimate_checkpoint(n, 4, "fp16")
    msg = str(e.value)
    assert f"needs ~{preflight.gib(estimate.needed_bytes)}" in msg and "0.12 GiB free" in msg, msg
    assert "124,439,808 parameters, fp16, 4 rank(s)" in msg and "checkpoint.keep_last=2" in msg
    plenty = SimpleNamespace(total=1 << 40, used=0, free=estimate.needed_bytes)
    assert preflight.check_run_dir(tmp_path / "run", n, 4, "fp16", disk_usage=lambda p: plenty) == estimate


def test_batch_arithmetic_and_resume_batch(tmp_path):
    cfg = load_config(RunConfig, None, ["train.micro_batch_size=8", "train.grad_accum=4"])
    with pytest.raises(ConfigError, match=r"train.micro_batch_size 8 x train.grad_accum 4 x 2 ranks"):
        preflight.check_batch(cfg.train, 50, world_size=2)
    assert preflight.check_batch(cfg.train, 64, world_size=2) == 64
    tag = tmp_path / ckpt.tag_for(4)
    tag.mkdir()
    (tag / "run_config.yaml").write_text("train:\n  micro_batch_size: 2\n  grad_accum: 1\n")
    (tag / ckpt.COMPLETE_MARKER).write_text(json.dumps({"step": 4, "world_size": 2}))
    assert preflight.saved_global_batch(tag) == 4
    preflight.check_resume_batch(tag, 4, world_size=1)  # 1 rank x micro 2 x accum 2 continues it
    with pytest.raises(ConfigError, match="global batch 4, this run has 8"):
        preflight.check_resume_batch(tag, 8, world_size=2)


# --------------------------------------------------------------------------------------------------
# `cic-gpt2 train` refuses before any process group
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def no_process_group(monkeypatch):
    """dist.init raises: a train run that gets that far fails the test instead of training."""
    from cic_gpt2 import dist

    def refuse(*args, **kwargs):
        raise AssertionError("dist.init reached: the error was not reported before the process group")

    monkeypatch.setattr(dist, "init", refuse)
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize("overrides, expected", [
    (["train.lrr=1"], "unknown config key train.lrr"),
    (["train.micro_batch_size=four"], "train.micro_batch_size must be an integer"),
    (["train.ds_config=no_such_file"], "train.ds_config='no_such_file'"),
])
def test_config_errors_are_reported_before_the_process_group(prepared_v2, tmp_path, overrides, expected):
    """A real `cic-gpt2 train` as rank 0 of 2 whose peer never comes: had it reached deepspeed.init_distributed
    it would wait there for rank 1 (up to dist.timeout_s=300). It exits 2 with one line naming the key."""
    start = time.monotonic()
    proc = run_proc(
        [sys.executable, "-m", "cic_gpt2", "train", "--data", str(prepared_v2), "--run-dir", str(tmp_path / "run"),
         "dist.timeout_s=300", *overrides],
        env=_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())),
        capture_output=True, text=True, timeout=200)
    elapsed = time.monotonic() - start
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("cic-gpt2 train: error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and elapsed < 120, elapsed
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fault", ["batch", "run_dir", "disk"])
def test_train_refuses_before_the_process_group(prepared_v2, tmp_path, capsys, monkeypatch, no_process_group, fault):
    run_dir, extra = tmp_path / "run", []
    if fault == "batch":
        extra = ["train.micro_batch_size=100000"]
        expected = "fewer than one global batch"
    elif fault == "run_dir":
        (tmp_path / "file").write_text("x")
        run_dir, expected = tmp_path / "file" / "run", "is not writable"
    else:
        import shutil

        monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=1 << 30, used=0, free=1 << 20))
        expected = "not enough free space for one checkpoint"
    assert run_cli("train", "--data", prepared_v2, "--run-dir", run_dir, "model.name=tiny", *extra) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err


# --------------------------------------------------------------------------------------------------
# fp16 overflow storm. End to end (a tiny loss-scale window, every step overflows) it is tests/test_train.py::
# test_fp16_overflow_steps_are_counted_and_stop_the_run, which skips on this CPU: DeepSpeed's CPU accelerator
# has no fp16. The guard itself is tested here.
# --------------------------------------------------------------------------------------------------
def test_skip_guard_stops_with_advice_after_max_consecutive_skips():
    """The trainer's SkipGuard on its own: below train.max_skipped_steps it lets the run go on (a step that is
    not skipped resets the streak); at the limit it stops with a TrainingStopped (a CicError: one line, exit 2)
    saying what to change."""
    from cic_gpt2.trainer import SkipGuard, TrainingStopped

    guard = SkipGuard(limit=3)
    for skipped in (1, 1, 0, 1, 1):
        guard.update(skipped, step=10, loss_scale=1.0)
    assert (guard.total, guard.in_a_row) == (4, 2)
    with pytest.raises(TrainingStopped) as e:
        guard.update(1, step=17, loss_scale=1.0)
    msg = str(e.value)
    assert isinstance(e.value, CicError)
    assert "3 optimizer steps in a row were skipped for fp16 overflow (step 17, loss scale 1)" in msg
    for advice in ("train.lr", "train.grad_clip", "train.precision=bf16", "train.max_skipped_steps"):
        assert advice in msg, advice
