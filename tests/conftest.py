"""Shared test setup: CPU DeepSpeed, no network, the bundled real CICIoT2023 rows."""
import os
import subprocess
import time
from pathlib import Path

import pytest

# Real DeepSpeed on CPU with gloo; one thread per rank (2 cores); never reach the Hub.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# DeepSpeed compiles a small CPU comm op once (~25 s); keep it across runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "cic_gpt2_torch_extensions"))

DATA_DIR = Path(__file__).resolve().parent.parent / "cic_gpt2" / "data"
SAMPLE_V1 = DATA_DIR / "ciciot2023_orig46_kittu7738_sample.csv"  # 46 features + label, 100 rows
SAMPLE_V2 = DATA_DIR / "ciciot2023_v2_39feat_robotumbel_sample.csv"  # 39 features + Label, 4,050 rows, CRLF


@pytest.fixture(scope="session")
def sample_v1() -> Path:
    return SAMPLE_V1


@pytest.fixture(scope="session")
def sample_v2() -> Path:
    return SAMPLE_V2


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
