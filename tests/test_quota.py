"""Lustre quotas in preflight (#13 item 10): a real `lfs` executable on PATH (a stub script printing the
format real Lustre prints) drives `quota.lustre_quotas` and `preflight.check_run_dir` through subprocess."""
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from cic_gpt2 import preflight
from cic_gpt2.errors import CicError
from cic_gpt2.quota import lustre_quotas, parse_lfs_quota

HEADER = "     Filesystem  kbytes   quota   limit   grace   files   quota   limit   grace"


def lfs_stub(tmp_path: Path, monkeypatch, user: str = "", group: str = "", rc: int = 0, sleep: float = 0) -> Path:
    """An `lfs` first on PATH that answers `lfs quota -u/-g ID PATH` with `user` / `group` and logs its argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "user.txt").write_text(user)
    (bin_dir / "group.txt").write_text(group)
    script = bin_dir / "lfs"
    script.write_text(f"""#!/bin/sh
echo "$@" >> "{bin_dir}/argv.log"
sleep {sleep}
if [ {rc} -ne 0 ]; then echo "lfs quota: '$4' not on a mounted Lustre filesystem" >&2; exit {rc}; fi
case "$2" in -u) cat "{bin_dir}/user.txt";; -g) cat "{bin_dir}/group.txt";; esac
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def record(kind: str, name: str, used_kb: str, limit_kb: str, files: str = "120", files_limit: str = "0") -> str:
    return (f"Disk quotas for {kind} {name} (id 3000123):\n{HEADER}\n"
            f"       /scratch {used_kb}       0 {limit_kb}       -     {files}       0 {files_limit}       -\n")


def test_parser_reads_the_formats_lustre_prints():
    q = parse_lfs_quota(record("usr", "alice", "1041408*", "6291456", "900", "1000"), "user", "alice")
    assert (q.filesystem, q.used_bytes, q.limit_bytes, q.used_files, q.limit_files) == (
        "/scratch", 1041408 * 1024, 6291456 * 1024, 900, 1000)
    assert q.free_bytes == (6291456 - 1041408) * 1024 and q.free_files == 100
    wrapped = ("Disk quotas for usr bob (uid 1):\n      Filesystem  kbytes   quota   limit   grace   files   quota limit\n"
               "grace\n        /lustre7 982177580       0 1000000000       - 443208230 0\n0       -\n"
               "uid 1 is using default file quota setting\n")
    q = parse_lfs_quota(wrapped, "user", "bob")
    assert (q.filesystem, q.used_bytes, q.limit_bytes, q.limit_files) == ("/lustre7", 982177580 * 1024, 10**9 * 1024, 0)
    bracketed = f"{HEADER}\n              /fred [1041408]  5242880 0       -     [0]       0       0       -\n"
    assert parse_lfs_quota(bracketed, "user", "x").limit_bytes == 5242880 * 1024  # soft quota when no hard limit
    human = f"{HEADER.replace('kbytes', 'used')}\n  /lustre 0k 8T 10T - 0 3000000 36000000 -\n"
    assert parse_lfs_quota(human, "user", "x") is None  # -h units: no figure rather than a wrong one
    assert parse_lfs_quota("", "user", "x") is None


def test_user_quota_nearly_full_is_refused_with_both_figures(tmp_path, monkeypatch):
    """The filesystem has room but the user has 1 GiB left of a 20 GiB quota: a 100M-parameter fp16 checkpoint
    (~1.4 GiB) does not fit, and the message says which quota and how much."""
    lfs_stub(tmp_path, monkeypatch, user=record("usr", "alice", str(19 * 2**20), str(20 * 2**20)))
    with pytest.raises(CicError) as e:
        preflight.check_run_dir(tmp_path / "run", 100_000_000, 4, "fp16", export=False)
    msg = str(e.value)
    assert "not enough quota for one checkpoint" in msg and "user quota of alice on /scratch" in msg
    assert "19.00 GiB of 20.00 GiB used" in msg and "1.00 GiB left" in msg and "diskusage_report" in msg
    argv = (tmp_path / "bin" / "argv.log").read_text().splitlines()
    assert argv[0].startswith(f"quota -u {os.getuid()} ") and argv[1].startswith("quota -g ")
    # the same quota with room: the check passes and returns the quota's free bytes, not the filesystem's
    lfs_stub(tmp_path, monkeypatch, user=record("usr", "alice", str(1 * 2**20), str(20 * 2**20)))
    est = preflight.estimate_checkpoint(100_000_000, 4, "fp16", export=False)
    plenty = lambda path: shutil._ntuple_diskusage(2**60, 0, 2**60)  # noqa: E731 (a huge filesystem)
    assert preflight.check_free_space(tmp_path, est, disk_usage=plenty) == 19 * 2**30


def test_group_file_count_quota_is_refused(tmp_path, monkeypatch):
    """/project on Alliance clusters: a group quota of files; a checkpoint of 8 ranks creates ~23 files."""
    lfs_stub(tmp_path, monkeypatch, group=record("grp", "def-lab", "100", "0", "499990", "500000"))
    with pytest.raises(CicError) as e:
        preflight.check_run_dir(tmp_path / "run", 1_000_000, 8, "fp16", export=False)
    msg = str(e.value)
    assert "not enough file quota" in msg and "~23 files, 10 left" in msg and "group quota of def-lab" in msg


def test_no_lustre_a_failing_or_hung_lfs_does_not_block_training(tmp_path, monkeypatch):
    lfs_stub(tmp_path, monkeypatch, rc=1)  # "not on a mounted Lustre filesystem"
    assert lustre_quotas(tmp_path) == []
    preflight.check_run_dir(tmp_path / "run", 1_000_000, 1)
    lfs_stub(tmp_path, monkeypatch, user=record("usr", "alice", "1", "0"), group=record("grp", "g", "1", "0"))
    assert lustre_quotas(tmp_path) == []  # no limits set: nothing to check
    lfs_stub(tmp_path, monkeypatch, user=record("usr", "alice", "1", "10"), sleep=30)  # a hung metadata server
    start = time.monotonic()
    assert lustre_quotas(tmp_path, timeout_s=0.5) == []
    assert time.monotonic() - start < 10


def test_a_stale_op_build_lock_is_refused_by_name(tmp_path, monkeypatch):
    """#13 item 5: torch waits on an extension's build `lock` with no timeout; a job killed mid-build leaves it.
    A fresh lock (a build running now) is left alone; an old one stops the run with its path and the fix."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "py311_cu121" / "fused_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    preflight.check_build_locks()  # fresh: another job may be building
    old = time.time() - preflight.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.raises(CicError, match=r"fused_adam/lock: a torch/DeepSpeed op build lock 3\d min old.*rm "):
        preflight.check_build_locks()
    lock.unlink()
    preflight.check_build_locks()
