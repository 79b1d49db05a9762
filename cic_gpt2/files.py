"""File-system helpers used everywhere: atomic writes, directory replacement, a free local port.

Nothing half-written is ever taken for complete: a file is written under a temporary name in the same
directory and renamed over the target (`os.replace` is atomic on POSIX, Lustre included)."""
from __future__ import annotations

import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cic_gpt2.errors import CicError


def temp_path(path: str | Path) -> Path:
    """A hidden sibling of `path`, unique to this process (two ranks or runs never share one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def check_output(path: str | Path, overwrite: bool, flag: str = "--output") -> Path:
    """Refuse an existing file, or a non-empty existing directory, at `path` unless `overwrite`: the one
    "already exists" check of every command that writes a file or report directory (one line, names the fix)."""
    path = Path(path)
    if not overwrite and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CicError(f"{path} already exists; pass --overwrite to replace it, or choose another {flag}")
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move the finished directory `src` onto `dst`. An existing `dst` is moved aside first and removed only
    after the new one is in place, so `dst` is at every moment either the old or the new directory."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free on `host` now (another process may still take it before use)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
