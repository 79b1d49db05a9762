"""`cic-gpt2 demo`: the main job on the bundled real CICIoT2023 sample (no download, CPU).

For now it prepares the merged-schema sample (4,050 real rows, 27 classes) into ./demo_out/prepared and
prints the summary; the training issue extends `run_demo` with the later stages.
"""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "whole pipeline on the bundled real CICIoT2023 sample (CPU, tiny GPT-2)"
SAMPLE_V2 = Path(__file__).resolve().parent / "data" / "ciciot2023_v2_39feat_robotumbel_sample.csv"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", default="demo_out", help="where the demo writes everything (default ./demo_out)")


def run_demo(out_dir: Path) -> dict[str, Path]:
    """Run each stage into out_dir; returns the paths of what it wrote."""
    from cic_gpt2 import prepare
    from cic_gpt2.cli import build_parser

    prepared = out_dir / "prepared"
    prepare.main(build_parser("prepare").parse_args(
        [str(SAMPLE_V2), "--output", str(prepared), "--classes", "8", "--overwrite"]))
    return {"prepared": prepared}


def main(args: argparse.Namespace) -> int:
    run_demo(Path(args.out_dir))
    return 0
