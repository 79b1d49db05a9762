"""Agreement between ranks for work one rank does alone (#13 items 2, 9, 11).

A rank-0-only section between two collectives (pruning checkpoints, side files, config.yaml, a metrics line)
that fails on rank 0 alone (a disk quota: OSError) would leave every other rank waiting in the next
collective for `dist.timeout_s`, then failing with a message about a lost peer. `on_main` runs such a
section on rank 0 and broadcasts its outcome, so every rank raises the same one-line error at once.
`check_shared_dir` proves a run dir is one directory for every rank; `agree` compares a value (the resume
tag each rank picked from its own listing) across ranks. Without a process group every helper runs locally.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Callable, Optional

from cic_gpt2.errors import CicError

SHARED_FILE = ".cic_gpt2_shared"


def initialized() -> bool:
    import torch.distributed as tdist

    return tdist.is_available() and tdist.is_initialized()


def barrier() -> None:
    import torch.distributed as tdist

    if initialized():
        tdist.barrier()


def broadcast(value: Any, src: int = 0) -> Any:
    """Rank `src`'s value on every rank (pickled: small objects only)."""
    import torch.distributed as tdist

    if not initialized():
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def gather(value: Any) -> list:
    """Every rank's value, in rank order, on every rank."""
    import torch.distributed as tdist

    if not initialized():
        return [value]
    out: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, value)
    return out


def on_main(is_main: bool, what: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Collective: rank 0 runs `fn(*args, **kwargs)`; every rank returns once it is done, or raises the same
    CicError naming `what` and rank 0's error. Rank 0 re-raises an unexpected (non-OSError) exception itself,
    with its traceback; the others get its one line."""
    result, error, unexpected = None, None, None
    if is_main:
        try:
            result = fn(*args, **kwargs)
        except OSError as e:
            error = f"{what} failed on rank 0: {e}. Free space or files (quota: `diskusage_report`), or fix the " \
                    f"permissions, then rerun the same command with --resume auto"
        except Exception as e:  # a bug: peers must still hear of it instead of waiting out the timeout
            error, unexpected = f"{what} failed on rank 0: {type(e).__name__}: {e}", e
    error = broadcast(error)
    if unexpected is not None:
        raise unexpected
    if error:
        raise CicError(error)
    return result


def check_shared_dir(run_dir: str | Path, rank: int, is_main: bool) -> Optional[str]:
    """Collective: rank 0 writes a fresh nonce into `run_dir`; after a barrier every rank must read it there.
    Every rank raises the same error naming the ranks that cannot (a node-local run dir on each node).
    Returns the nonce (None without a process group)."""
    if not initialized():
        return None
    path = Path(run_dir) / SHARED_FILE
    nonce = on_main(is_main, f"writing {path}", _write_nonce, path)
    nonce = broadcast(nonce)
    try:
        seen = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        seen = f"unreadable ({e.strerror or e})"
    views, main_path = gather(seen), broadcast(str(path))  # rank 0's names: the same line on every rank
    blind = [r for r, v in enumerate(views) if v != nonce]
    if blind:
        raise CicError(
            f"run dir {Path(main_path).parent} is not shared across nodes: rank(s) {', '.join(map(str, blind))} do "
            f"not see the file {main_path} rank 0 just wrote (rank {blind[0]} sees {views[blind[0]]!r}); --run-dir must be on a "
            f"filesystem every node mounts (e.g. /scratch), not a node-local disk such as /tmp or $SLURM_TMPDIR")
    return nonce


def _write_nonce(path: Path) -> str:
    from cic_gpt2.files import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    nonce = secrets.token_hex(8) + f"-{os.getpid()}"
    write_text(path, nonce + "\n")
    return nonce


def agree(value: Any, what: str, describe: Callable[[Any], str] = repr) -> Any:
    """Collective: every rank's `value` must equal rank 0's; else every rank raises the same error listing
    each rank's value. Returns the agreed value."""
    values = gather(value)
    if any(v != values[0] for v in values):
        listed = "; ".join(f"rank {r}: {describe(v)}" for r, v in enumerate(values))
        raise CicError(f"the ranks disagree on {what} ({listed})")
    return values[0]
