"""The universal-conversion handshake (#13 item 2) without processes: what a waiting rank does with each
status rank 0 may leave, and rank 0's own failures (converter exit status, convert_timeout_s). The real
2-rank runs (a slow conversion, a failing one, rank 0 killed mid-conversion, `cic-gpt2 convert`) are in
tests/test_faults.py."""
import json
import os
import sys
import time
from pathlib import Path

import pytest

from cic_gpt2 import universal
from cic_gpt2.config import CheckpointConfig
from cic_gpt2.errors import CicError, ConfigError


def _status(tag_dir, **fields):
    (tag_dir / universal.STATUS_FILE).write_text(json.dumps({"beat": 1, "error": "", **fields}))


def test_a_waiting_rank_returns_on_done_and_raises_rank_0s_line_on_failed(tmp_path):
    _status(tmp_path, nonce="n1", state="done")
    assert universal.convert(tmp_path, is_main=False, nonce="n1", lost_after_s=5) == tmp_path / "universal"
    _status(tmp_path, nonce="n1", state="failed", error="converting X failed on rank 0: boom")
    with pytest.raises(CicError, match="^converting X failed on rank 0: boom$"):
        universal.convert(tmp_path, is_main=False, nonce="n1", lost_after_s=5)


def test_a_status_of_an_earlier_launch_is_ignored_and_silence_fails_naming_rank_0(tmp_path, monkeypatch):
    """A `done` left by another launch (other nonce) is not this one's: the rank waits, and fails once
    `lost_after_s` passes without a status of its own launch."""
    monkeypatch.setattr(universal, "POLL_S", 0.05)
    _status(tmp_path, nonce="earlier", state="done")
    start = time.monotonic()
    with pytest.raises(CicError) as e:
        universal.convert(tmp_path, is_main=False, nonce="now", lost_after_s=1.0, saved_world_size=4)
    assert time.monotonic() - start >= 1.0
    assert str(e.value).startswith(f"rank 0 stopped converting {tmp_path} to a universal checkpoint: no status "
                                   f"of this launch in {tmp_path / universal.STATUS_FILE} is over 1 s old")
    assert "resume with 4 processes" in str(e.value) and f"`cic-gpt2 convert {tmp_path}`" in str(e.value)


def test_rank_0_reports_the_converters_exit_status_and_last_line(tmp_path, monkeypatch):
    monkeypatch.setattr(universal, "converter_command", lambda tag_dir, out, workers: [
        sys.executable, "-c", "print('step 1'); print('KeyError: param_shapes'); raise SystemExit(5)"])
    with pytest.raises(CicError) as e:
        universal.convert(tmp_path, is_main=True, nonce="n", saved_world_size=2)
    assert str(e.value) == (
        f"converting {tmp_path} (written by 2 ranks) to a universal checkpoint failed (exit 5): KeyError: "
        f"param_shapes (log: {tmp_path / universal.LOG_FILE}). Resume with 2 processes instead")
    status = json.loads((tmp_path / universal.STATUS_FILE).read_text())
    assert status["state"] == "failed" and status["error"] == str(e.value) and status["nonce"] == "n"
    assert not (tmp_path / "universal").exists()


def test_rank_0_stops_a_converter_past_convert_timeout_s_and_says_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(universal, "HEARTBEAT_S", 0.1)
    pid_file = tmp_path / "pid"
    monkeypatch.setattr(universal, "converter_command", lambda tag_dir, out, workers: [
        sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                              f"time.sleep(60)"])
    start = time.monotonic()
    with pytest.raises(CicError, match=r"took more than checkpoint.convert_timeout_s=1 s; raise it, or convert "
                                       r"beforehand with `cic-gpt2 convert "):
        universal.convert(tmp_path, is_main=True, nonce="n", timeout_s=1.0)
    assert time.monotonic() - start < 30
    status = json.loads((tmp_path / universal.STATUS_FILE).read_text())
    assert status["state"] == "failed" and status["beat"] >= 3  # "running" + heartbeats, then "failed"
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # the converter was killed and reaped
        os.kill(pid, 0)


def test_without_a_process_group_nothing_is_written_for_peers(tmp_path, monkeypatch):
    (tmp_path / "COMPLETE").write_text("{}")
    def fake(tag_dir, out, workers):  # a converter that writes its output dir
        return [sys.executable, "-c", f"import os; os.makedirs({str(out)!r})"]
    monkeypatch.setattr(universal, "converter_command", fake)
    out = universal.convert(tmp_path, is_main=True)
    assert (out / "COMPLETE").is_file() and not (tmp_path / universal.STATUS_FILE).exists()
    monkeypatch.setattr(universal, "converter_command", lambda *a: pytest.fail("converted twice"))
    assert universal.convert(tmp_path, is_main=True) == out  # complete: not converted again


def test_workers_and_timeout_bounds():
    assert 1 <= universal.default_workers() <= universal.MAX_WORKERS
    assert "--num_merge_workers" in universal.converter_command(Path("a"), Path("b"), 3)
    with pytest.raises(ConfigError, match="checkpoint.convert_timeout_s=-1"):
        CheckpointConfig(convert_timeout_s=-1)
