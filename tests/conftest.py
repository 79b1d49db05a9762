"""Shared test setup: CPU DeepSpeed, no network, the bundled real CICIoT2023 rows."""
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

# Real DeepSpeed on CPU with gloo; one thread per rank (2 cores); never reach the Hub.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# DeepSpeed JIT-compiles a small CPU comm op under TORCH_EXTENSIONS_DIR behind a lock file that torch waits on
# with no timeout. A directory shared with other processes on the machine (another test run, a user's job, a
# build killed mid-way that left its lock behind) can stall this suite for as long as they hold it, so every
# session gets its own: the op is built once (fixture `deepspeed_ops`, ahead of the multi-process tests), then
# reused by every subprocess, and the directory is removed at the end.
_SESSION_EXT_DIR = tempfile.mkdtemp(prefix="cic_gpt2_torch_ext_")
os.environ["TORCH_EXTENSIONS_DIR"] = _SESSION_EXT_DIR

DATA_DIR = Path(__file__).resolve().parent.parent / "cic_gpt2" / "data"
SAMPLE_V1 = DATA_DIR / "ciciot2023_orig46_kittu7738_sample.csv"  # 46 features + label, 100 rows
SAMPLE_V2 = DATA_DIR / "ciciot2023_v2_39feat_robotumbel_sample.csv"  # 39 features + Label, 4,050 rows, CRLF


@pytest.fixture(scope="session")
def sample_v1() -> Path:
    return SAMPLE_V1


@pytest.fixture(scope="session")
def sample_v2() -> Path:
    return SAMPLE_V2


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_EXT_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    for item in items:  # multi-process tests start several DeepSpeed processes: build the op once before them
        if item.get_closest_marker("slow"):
            item.fixturenames.insert(0, "deepspeed_ops")


@pytest.fixture(scope="session")
def deepspeed_ops():
    """DeepSpeed's CPU shared-memory comm op, compiled once into this session's TORCH_EXTENSIONS_DIR."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    builder = ShareMemCommBuilder()
    if builder.is_compatible():
        builder.load(verbose=False)
    return _SESSION_EXT_DIR


def last_lines(text: str | bytes | None, n: int = 25) -> str:
    """The tail of a process's output, for a failure message that says what it was doing."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-n:])


def run_cli(*argv: str) -> int:
    from cic_gpt2.cli import main

    return main([str(a) for a in argv])


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes of every process, waiting at most `timeout` s in all; kills (and reaps) any still running."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="session")
def prepared_v2(tmp_path_factory) -> Path:
    """The merged-schema sample prepared once per session: 8-class grouping, compact template."""
    out = tmp_path_factory.mktemp("prepared") / "v2_8class"
    assert run_cli("prepare", SAMPLE_V2, "--output", out, "--classes", "8", "--seed", "0") == 0
    return out


def run_proc(cmd, *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with captured text output; a hang fails the test with the process's last output lines."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    try:
        return subprocess.run(cmd, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung: no exit after {timeout:.0f} s: {' '.join(map(str, cmd))}\n"
                    f"--- last stdout ---\n{last_lines(e.stdout)}\n--- last stderr ---\n{last_lines(e.stderr)}",
                    pytrace=False)
