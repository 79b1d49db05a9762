"""`cic-gpt2 convert CHECKPOINT [--workers N]`: reshard a checkpoint for another world size before the job.

    cic-gpt2 convert runs/r1                                  # the run's latest complete checkpoint
    cic-gpt2 convert runs/r1/checkpoints/step-000400 --workers 8

Writes CHECKPOINT/universal/ (DeepSpeed's universal format; temp dir + rename), which `--resume` at another
number of ranks loads instead of converting on rank 0 inside the allocation (docs/training.md, "Checkpoints
and resume"). Run it on a CPU node or the login node's `salloc`: it needs no GPU, only memory for the model's
fp32 weights and optimizer states.
"""
from __future__ import annotations

import argparse
import time

HELP = "reshard a checkpoint to DeepSpeed's universal format (resume at another world size) before the job"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a step-NNNNNN dir, RUN_DIR/checkpoints, or RUN_DIR (its latest complete checkpoint)")
    parser.add_argument("--workers", type=int, default=None,
                        help="extract/merge worker processes (default: this process's CPUs, at most 8)")


def main(args: argparse.Namespace) -> int:
    from cic_gpt2.checkpoint import UNIVERSAL_DIR, is_complete, resolve_tag_dir, saved_world_size
    from cic_gpt2.errors import CicError
    from cic_gpt2.universal import convert, default_workers

    if args.workers is not None and args.workers < 1:
        raise CicError(f"--workers {args.workers}: must be >= 1")
    tag_dir = resolve_tag_dir(args.checkpoint, "convert")
    workers = args.workers or default_workers()
    ranks = saved_world_size(tag_dir)
    if is_complete(tag_dir / UNIVERSAL_DIR):
        print(f"{tag_dir / UNIVERSAL_DIR} is already complete")
        return 0
    print(f"converting {tag_dir} (saved by {ranks} ranks) to {tag_dir / UNIVERSAL_DIR} with {workers} workers ...",
          flush=True)
    start = time.perf_counter()
    out = convert(tag_dir, is_main=True, workers=workers, saved_world_size=ranks)
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s: resume with any number of ranks "
          f"(`--resume {tag_dir}` or `--resume auto`)")
    return 0
