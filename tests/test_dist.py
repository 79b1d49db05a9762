"""Rank discovery from each launcher's environment, SLURM node lists, process-group setup."""
from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys

import pytest

from cic_gpt2 import dist
from cic_gpt2.config import load_config
from cic_gpt2.errors import ConfigError


# ---------------------------------------------------------------------------------------------
# discover(): one environment per launcher, as the launcher really sets it
# ---------------------------------------------------------------------------------------------
def test_torchrun_env():
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "gpu01", "MASTER_PORT": "29400", "GROUP_RANK": "1"}
    info = dist.discover(env)
    assert info == dist.DistInfo(5, 1, 8, "gpu01", 29400, "torchrun")
    assert not info.is_main and info.is_distributed


def test_torchrun_wins_over_slurm():
    # torchrun started inside an sbatch allocation: the SLURM batch variables are still there.
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "gpu[01-02]"}
    info = dist.discover(env)
    assert (info.rank, info.world_size, info.source) == (1, 2, "torchrun")


def test_slurm_env_master_is_first_node_and_port_from_job_id():
    env = {"SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "4242"}
    info = dist.discover(env)
    assert (info.rank, info.local_rank, info.world_size) == (6, 2, 8)
    assert info.master_addr == "gpu03"
    assert info.master_port == dist.slurm_port("4242")
    assert info.source == "slurm"
    # Every task of the job computes the same port; another job gets another one.
    other = dist.discover({**env, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
    assert other.master_port == info.master_port and other.is_main
    assert dist.discover({**env, "SLURM_JOB_ID": "4243"}).master_port != info.master_port


def test_slurm_port_range_and_override():
    for job_id in ("0", "1", "16999", "17000", "58123456", "123_4"):
        for step in ("0", "1", "7", "4294967291"):
            assert 10000 <= dist.slurm_port(job_id, step) < 32768, (job_id, step)  # below the ephemeral range
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "n1",
           "SLURM_JOB_ID": "7", "MASTER_PORT": "12345", "MASTER_ADDR": "n1-ib"}
    info = dist.discover(env)
    assert (info.master_addr, info.master_port) == ("n1-ib", 12345)


def test_slurm_ports_of_nearby_jobs_and_steps_never_collide():
    """#13 item 14: `15000 + id % 17000` gave jobs 17,000 ids apart one port (a long job and one submitted a few
    hours later on a busy cluster, on the same node)."""
    base = 58_123_456
    assert dist.slurm_port(str(base)) != dist.slurm_port(str(base + 17_000))
    # step 0 (one srun per job, the sbatch scripts): every port of the span, once, for 22,767 consecutive ids
    assert len({dist.slurm_port(str(base + i)) for i in range(dist.SLURM_PORT_SPAN)}) == dist.SLURM_PORT_SPAN
    # steps 0-7 of jobs fewer than 2,845 ids apart: all distinct
    ports = [dist.slurm_port(str(base + i), str(s)) for i in range(2845) for s in range(8)]
    assert len(set(ports)) == len(ports)
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "n1",
           "SLURM_JOB_ID": "77"}
    ports = {dist.discover({**env, "SLURM_STEP_ID": str(s)}).master_port for s in range(3)}
    assert len(ports) == 3  # two concurrent `srun ... &` steps of one job do not share a rendezvous


def test_batch_shell_of_a_multi_task_job_is_one_process_with_a_warning(capsys):
    """#13 item 14: the batch shell has SLURM_PROCID=0 and SLURM_NTASKS=4 too, but no srun step variables; as
    rank 0 of 4 it waited for 3 peers nothing starts. It is a world of 1, with a warning that says srun."""
    batch = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[01-02]",
             "SLURM_JOB_ID": "5", "SLURM_NODEID": "0"}
    info = dist.discover(batch)
    assert (info.rank, info.world_size, info.source) == (0, 1, "single")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SLURM_NTASKS=4" in err and "srun launch/srun.sh" in err
    step = {**batch, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "gpu[01-02]"}
    assert (dist.discover(step).world_size, dist.discover(step).source) == (4, "slurm")
    assert dist.discover({**batch, "SLURM_NTASKS": "1"}).source == "slurm"  # a 1-task job: nothing to warn about
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_batch_shell_process_group_starts_instead_of_waiting_for_peers(tmp_path):
    """A real process in a 4-task job's batch-shell environment builds its process group (gloo) and returns;
    before the fix it waited for 3 peers until the timeout."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="4", SLURM_JOB_NODELIST="localhost",
               SLURM_JOB_ID="5", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    code = ("from cic_gpt2 import dist; import torch.distributed as t; info = dist.discover(); dist.init(info, 20); "
            "print('world', t.get_world_size()); dist.destroy()")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world 1" in out.stdout and "srun launch/srun.sh" in out.stderr


def test_slurm_step_nodelist_and_step_size_win():
    # `srun -N1 -n2` inside a 2-node, 8-task allocation: the step is smaller than the job.
    env = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2",
           "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_STEP_NODELIST": "gpu02", "SLURM_JOB_ID": "9"}
    info = dist.discover(env)
    assert (info.world_size, info.master_addr) == (2, "gpu02")


def test_openmpi_env():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4",
           "MASTER_ADDR": "node7"}
    assert dist.discover(env) == dist.DistInfo(3, 1, 4, "node7", dist.DEFAULT_PORT, "openmpi")


def test_nothing_set_is_one_process_on_a_free_port():
    info = dist.discover({})
    assert (info.rank, info.local_rank, info.world_size, info.source) == (0, 0, 1, "single")
    assert info.is_main and not info.is_distributed
    assert 0 < info.master_port < 65536
    assert dist.discover({"MASTER_PORT": "23456"}).master_port == 23456


def test_discover_reads_os_environ(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("SLURM_", "OMPI_")) or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "localhost")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert dist.discover() == dist.DistInfo(1, 1, 2, "localhost", dist.slurm_port("77"), "slurm")


@pytest.mark.parametrize("env, fragment", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_JOB_NODELIST"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "two", "SLURM_JOB_NODELIST": "n1"}, "SLURM_NTASKS='two'"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_SIZE"),
])
def test_bad_env_names_the_variable(env, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        dist.discover(env)


# ---------------------------------------------------------------------------------------------
# SLURM node lists as sinfo/squeue print them on real clusters
# ---------------------------------------------------------------------------------------------
NODELISTS = [
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("node-[1-2],login3", ["node-1", "node-2", "login3"]),
    ("cdr[2-3]-ib[0-1]", ["cdr2-ib0", "cdr2-ib1", "cdr3-ib0", "cdr3-ib1"]),
    ("blg[4101-4103]", ["blg4101", "blg4102", "blg4103"]),  # Beluga
    ("ng[10101,10203]", ["ng10101", "ng10203"]),  # Narval
    ("cdr2468", ["cdr2468"]),  # Cedar, one node
    ("localhost", ["localhost"]),
    ("gpu[008-011]", ["gpu008", "gpu009", "gpu010", "gpu011"]),  # zero-padded across a digit boundary
    ("n[8-10]", ["n8", "n9", "n10"]),  # unpadded, width grows
    ("a[1-2],b[09-10],c", ["a1", "a2", "b09", "b10", "c"]),
    ("gra[1001-1002,1005],gra1010", ["gra1001", "gra1002", "gra1005", "gra1010"]),  # Graham
    ("nc[10001-10002]-ib", ["nc10001-ib", "nc10002-ib"]),
    (" gpu[1-2] ", ["gpu1", "gpu2"]),
]


@pytest.mark.parametrize("nodelist, hosts", NODELISTS)
def test_parse_nodelist(nodelist, hosts):
    assert dist.parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "gpu[01-04", "gpu01-04]", "gpu[4-1]", "gpu[a-b]", "gpu[]", "x]y[1]"])
def test_parse_nodelist_rejects_malformed(nodelist):
    with pytest.raises(ConfigError, match="node list"):
        dist.parse_nodelist(nodelist)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol (SLURM) not installed here")
def test_parse_nodelist_agrees_with_scontrol():
    """On a cluster login node: the table above is what SLURM itself says."""
    for nodelist, hosts in NODELISTS:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist.strip()], capture_output=True, text=True,
                             check=True).stdout.split()
        assert out == hosts, nodelist


# ---------------------------------------------------------------------------------------------
# Backend, device, timeout
# ---------------------------------------------------------------------------------------------
def test_cuda_index():
    assert dist.cuda_index(3, 4) == 3
    assert dist.cuda_index(3, 1) == 0  # --gpus-per-task=1: each task sees only its own GPU
    with pytest.raises(ConfigError, match="local rank 4"):
        dist.cuda_index(4, 4)
    with pytest.raises(ConfigError, match="no CUDA device"):
        dist.cuda_index(0, 0)


CLAIM = r"""
import sys, time
from pathlib import Path
from cic_gpt2.dist import claim_gpu
local_rank, visible, claim_dir = int(sys.argv[1]), sys.argv[2].split(","), Path(sys.argv[3])
while not (claim_dir / "go").exists():  # start together: the claims race
    time.sleep(0.01)
print(visible[claim_gpu(visible, local_rank, claim_dir)])
time.sleep(1)  # hold the claim while the others run (it is released at exit)
"""


def _claims(tmp_path, visible_per_task: list[str]) -> list[str]:
    claim_dir = tmp_path / "claims"
    claim_dir.mkdir(parents=True)
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM, str(rank), visible, str(claim_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, visible in enumerate(visible_per_task)]
    (claim_dir / "go").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    return [out.strip() if p.returncode == 0 else f"error: {err.strip().splitlines()[-1]}"
            for p, (out, err) in zip(procs, outs)]


def test_gpu_bind_closest_with_cyclic_tasks_gives_every_task_its_own_gpu(tmp_path):
    """#13 item 14: `--gpu-bind=closest`, 4 tasks, 2 sockets x 2 GPUs, default block:cyclic distribution: local
    ranks 0 and 2 see GPUs 0,1; ranks 1 and 3 see 2,3. `local_rank % visible` put ranks 0 and 2 on GPU 0 (and
    `local_rank` alone was out of range for 2 and 3). Real concurrent processes claim their GPU."""
    sockets = ["0,1", "2,3", "0,1", "2,3"]
    assert [s.split(",")[r % 2] for r, s in enumerate(sockets)] == ["0", "3", "0", "3"]  # the old choice
    got = _claims(tmp_path, sockets)
    assert sorted(got) == ["0", "1", "2", "3"], got


def test_tasks_that_see_every_gpu_keep_gpu_local_rank_and_one_too_many_is_an_error(tmp_path):
    assert _claims(tmp_path, ["0,1,2,3"] * 4) == ["0", "1", "2", "3"]
    got = _claims(tmp_path / "x", ["0,1", "0,1", "0,1"])
    assert sorted(got)[:2] == ["0", "1"] and "has no GPU" in sorted(got)[2] and "one task per GPU" in sorted(got)[2]


def test_backend_and_device_follow_cuda(monkeypatch, tmp_path):
    import torch

    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path))
    monkeypatch.setattr(dist, "_local_device", {})

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert dist.backend_for_device() == "nccl"
    assert dist.device(dist.DistInfo(6, 2, 8, "h", 1, "slurm")) == torch.device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist.backend_for_device() == "gloo"
    assert dist.device(dist.DistInfo(6, 2, 8, "h", 1, "slurm")) == torch.device("cpu")


def test_timeout_comes_from_config():
    assert load_config(overrides=["dist.timeout_s=45"]).dist.timeout_s == 45.0


def test_init_single_process_gloo_with_timeout(monkeypatch):
    """A real process group of one (what `cic-gpt2 train` does without a launcher): gloo on CPU, torch
    variables exported for DeepSpeed, the configured timeout on the group."""
    import torch
    import torch.distributed as tdist

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so init()'s exports are undone after the test
        monkeypatch.delenv(key)
    assert not tdist.is_initialized()
    info = dist.discover({})
    try:
        assert dist.init(info, timeout_s=42) == "gloo"
        assert tdist.is_initialized() and tdist.get_world_size() == 1 and tdist.get_backend() == "gloo"
        assert os.environ["MASTER_PORT"] == str(info.master_port) and os.environ["RANK"] == "0"
        group_timeout = tdist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout
        assert group_timeout == datetime.timedelta(seconds=42)
        t = torch.ones(1)
        tdist.all_reduce(t)
        assert t.item() == 1.0
    finally:
        dist.destroy()
    assert not tdist.is_initialized()


def test_init_leaves_no_env_behind():
    # The test above must not leak RANK/WORLD_SIZE into later tests' subprocesses (they would look like torchrun).
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
