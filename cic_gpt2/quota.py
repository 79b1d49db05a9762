"""Per-user and per-group quotas on Lustre (`lfs quota`), the limit that binds on Alliance /scratch and /project.

`shutil.disk_usage` reports the whole filesystem (petabytes free on /scratch) while the user has a few TB and
a file-count limit left. `lustre_quotas(path)` asks `lfs quota` for the user's and the directory group's limits
where `lfs` is on PATH; anything that goes wrong there (no lfs, not a Lustre mount, a hung metadata server) is
not an error: preflight falls back to the filesystem figure and its probe write.

Parsed: the standard (not `-h`) output, kbytes and file counts, e.g.

    Disk quotas for usr alice (uid 3000123):
         Filesystem  kbytes   quota   limit   grace   files   quota   limit   grace
           /scratch 1041408* 5242880 6291456       -     120       0  1000000       -

A value over its limit carries `*` (some versions bracket it: `[1041408]`); a long filesystem name puts the
numbers on the next line. A limit of 0 means none (the soft `quota` counts when no hard `limit` is set).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

LFS_TIMEOUT_S = 20.0
HEADER_WORDS = {"kbytes", "used", "quota", "limit", "grace", "files"}


@dataclass(frozen=True)
class Quota:
    kind: str  # "user" | "group"
    owner: str  # the name `lfs` printed (or the id asked for)
    filesystem: str
    used_bytes: int
    limit_bytes: int  # 0: no limit
    used_files: int
    limit_files: int  # 0: no limit

    @property
    def free_bytes(self) -> Optional[int]:
        return max(0, self.limit_bytes - self.used_bytes) if self.limit_bytes else None

    @property
    def free_files(self) -> Optional[int]:
        return max(0, self.limit_files - self.used_files) if self.limit_files else None

    def describe(self) -> str:
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        parts = []
        if self.limit_bytes:
            parts.append(f"{gib(self.used_bytes)} of {gib(self.limit_bytes)} used")
        if self.limit_files:
            parts.append(f"{self.used_files:,} of {self.limit_files:,} files")
        return f"{self.kind} quota of {self.owner} on {self.filesystem}: " + ", ".join(parts)


def _number(token: str) -> int:
    return int(token.strip("[]*"))


def parse_lfs_quota(text: str, kind: str, owner: str) -> Optional[Quota]:
    """The first quota record of `lfs quota` output, or None when there is none."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        head = line.split()
        if len(head) < 2 or head[0] != "Filesystem" or head[1] not in ("kbytes", "used"):
            continue
        tokens = " ".join(lines[i + 1:]).split()
        while tokens and tokens[0] in HEADER_WORDS:  # a wrapped header line
            tokens = tokens[1:]
        if len(tokens) < 8:
            return None
        fs, (used_kb, quota_kb, limit_kb), (files, files_quota, files_limit) = tokens[0], tokens[1:4], tokens[5:8]
        try:
            return Quota(kind, owner, fs, _number(used_kb) * 1024, (_number(limit_kb) or _number(quota_kb)) * 1024,
                         _number(files), _number(files_limit) or _number(files_quota))
        except ValueError:  # `-h` units or a format this parser does not know: no figure rather than a wrong one
            return None
    return None


def _ask(flag: str, who: str, path: Path, kind: str, timeout_s: float) -> Optional[Quota]:
    try:
        proc = subprocess.run(["lfs", "quota", flag, who, str(path)], capture_output=True, text=True,
                              timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    named = re.search(r"Disk quotas for \S+ (\S+)", proc.stdout)
    return parse_lfs_quota(proc.stdout, kind, named.group(1) if named else who)


def lustre_quotas(path: str | Path, timeout_s: float = LFS_TIMEOUT_S) -> list[Quota]:
    """The user's and the directory group's quotas on the Lustre filesystem holding `path` ([] without lfs)."""
    if shutil.which("lfs") is None:
        return []
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    out = [_ask("-u", str(os.getuid()), path, "user", timeout_s),
           _ask("-g", str(path.stat().st_gid), path, "group", timeout_s)]
    return [q for q in out if q is not None and (q.limit_bytes or q.limit_files)]
