"""dist.extensions_dir: one DeepSpeed op build directory per torch + DeepSpeed install, for every launcher.

Why it matters: torch's default build directory is shared by every install of one Python version, and the build
command names the install's absolute paths, so two installs rebuilt the op (minutes) each time the other ran."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from cic_gpt2 import dist

REPO = Path(__file__).resolve().parent.parent
SITE = Path(torch.__file__).resolve().parent.parent  # the site-packages dir holding torch and deepspeed


def test_an_explicit_torch_extensions_dir_wins():
    assert dist.extensions_dir({"TORCH_EXTENSIONS_DIR": "/x/ext", "XDG_CACHE_HOME": "/c"}) == "/x/ext"


def test_the_default_is_stable_and_under_the_user_cache(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    first = dist.extensions_dir(env)
    assert first == dist.extensions_dir(env)  # every process, launcher and rank of this install agree
    assert Path(first).parent == tmp_path / "torch_extensions"
    assert Path(first).name.startswith(f"cic-gpt2-py{sys.version_info[0]}{sys.version_info[1]}-")


def _in_subprocess(tmp_path: Path, extra_path: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR", "PYTHONPATH")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=os.pathsep.join(filter(None, [extra_path, str(REPO)])))
    out = subprocess.run([sys.executable, "-c", "from cic_gpt2 import dist; print(dist.extensions_dir())"],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


def test_another_install_gets_its_own_directory(tmp_path):
    """The same packages reached through another path build with other -I/-isystem paths (what a second virtualenv
    does): a directory of their own, instead of a rebuild on every switch."""
    other = tmp_path / "other-site-packages"
    other.symlink_to(SITE, target_is_directory=True)
    here, there = _in_subprocess(tmp_path, None), _in_subprocess(tmp_path, str(other))
    assert here == dist.extensions_dir({"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert there != here and Path(there).parent == Path(here).parent


def test_init_exports_it_before_deepspeed_builds_its_op(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR",)}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    code = ("import os, unittest.mock as m, deepspeed; from cic_gpt2 import dist\n"
            "with m.patch.object(deepspeed, 'init_distributed', lambda **k: print(os.environ['TORCH_EXTENSIONS_DIR'])):\n"
            "    dist.init(dist.discover({}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == dist.extensions_dir({"XDG_CACHE_HOME": str(tmp_path / "cache")})
