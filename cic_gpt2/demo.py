"""`cic-gpt2 demo`: the whole pipeline on the bundled real CICIoT2023 sample (no download, CPU, minutes).

    cic-gpt2 demo                       # 8-class grouping, 2 processes, ./demo_out
    cic-gpt2 demo --classes 34          # all classes present in the sample (27)
    cic-gpt2 demo --nproc 1 train.epochs=2

`run_demo` runs prepare -> torchrun train -> test metrics beside a RandomForest -> export. Stages, outputs
and what the demo gives: docs/training.md ("The CPU recipe (`configs/cpu_tiny.yaml`) and the demo").
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cic_gpt2.errors import CicError
from cic_gpt2.files import free_port

HELP = "whole pipeline on the bundled real CICIoT2023 sample (CPU, tiny GPT-2)"
SAMPLE_V2 = Path(__file__).resolve().parent / "data" / "ciciot2023_v2_39feat_robotumbel_sample.csv"

# The shipped CPU recipe (configs/cpu_tiny.yaml, chosen on validation macro-F1: docs/training.md has the
# sweep) on the binned template it was chosen for: a tiny GPT-2 from scratch, one word per feature.
RECIPE = "cpu_tiny"
TEMPLATE = "binned"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", default="demo_out", help="where the demo writes everything (default ./demo_out)")
    p.add_argument("--classes", default="8", choices=("8", "34"),
                   help="8-class grouping (default) or the individual classes (27 occur in the sample)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (torchrun --nproc_per_node; default 2)")
    p.add_argument("--no-baseline", action="store_true", help="skip the RandomForest comparison")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra train overrides, e.g. train.epochs=2")


def train_command(prepared: Path, run_dir: Path, nproc: int, overrides: list[str]) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    for item in overrides:  # the user's KEY=VALUE wins over the recipe's setting of the same key
        if "=" not in item:
            raise CicError(f"override {item!r} must look like section.key=value (e.g. train.epochs=2)")
    return [*launcher, "-m", "cic_gpt2", "train", "--data", str(prepared), "--run-dir", str(run_dir),
            "--config", RECIPE, *overrides]


def prepare_command(prepared: Path, classes: str) -> list[str]:
    return [sys.executable, "-m", "cic_gpt2", "prepare", str(SAMPLE_V2), "--output", str(prepared),
            "--classes", classes, "--template", TEMPLATE, "--seed", "0", "--overwrite"]


def run_demo(out_dir: Path, classes: str = "8", nproc: int = 2, overrides: list[str] | None = None,
             baseline: bool = True) -> dict:
    """Run each stage into out_dir; returns {paths..., "test": metrics, "baselines": {...}, timings}."""
    if nproc < 1:
        raise CicError(f"--nproc {nproc}: need at least 1 process")
    out_dir = Path(out_dir)
    prepared, run_dir = out_dir / "prepared", out_dir / "run"
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    print(f"[1/4] prepare {SAMPLE_V2.name} -> {prepared}", flush=True)
    rc = subprocess.run(prepare_command(prepared, classes)).returncode
    if rc != 0:
        raise CicError(f"prepare exited with status {rc} (its messages are above); the output dir is {prepared}")
    timings["prepare_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if run_dir.exists():  # the demo owns this directory: every demo is a fresh run
        shutil.rmtree(run_dir)
    cmd = train_command(prepared, run_dir, nproc, list(overrides or []))
    print(f"[2/4] train ({nproc} process{'es' if nproc > 1 else ''}, ZeRO-2, CPU): {' '.join(cmd[1:])}", flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: ranks share the cores
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # torchrun sets them for its children
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise CicError(f"training exited with status {rc} (its messages are above); the run dir is {run_dir}")
    timings["train_s"] = time.perf_counter() - t0

    summary = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    result = {"prepared": prepared, "run_dir": run_dir, "export": run_dir / "export", "test": summary["test"],
              "val": summary["val"], "baselines": {}, "timings": timings}
    if baseline:
        from cic_gpt2.trees import run_baselines

        t0 = time.perf_counter()
        print("[3/4] test-split metrics; RandomForest on the same split for comparison", flush=True)
        result["baselines"] = run_baselines(prepared, models="rf", seed=0)
        timings["baseline_s"] = time.perf_counter() - t0
    print(f"[4/4] export: {result['export']}", flush=True)
    print(report(result), flush=True)
    return result


def report(result: dict) -> str:
    from cic_gpt2.metrics import compare_markdown, metrics_markdown

    run_dir = result["run_dir"]
    test = result["test"]
    # train already printed the tiny model's full report (per class); here: the comparison on the same rows.
    lines = ["", f"### test split ({test['n']} rows, {test['macro_classes']} classes in the macro average)", ""]
    if result["baselines"]:
        lines.append(compare_markdown({"tiny GPT-2 (ours)": test, **result["baselines"]}))
    else:
        lines.append(metrics_markdown(test, title="tiny GPT-2 (DeepSpeed ZeRO-2)"))
    t = result["timings"]
    lines += [
        "",
        f"time: prepare {t.get('prepare_s', 0):.0f} s, train+eval+export {t.get('train_s', 0):.0f} s"
        + (f", baseline {t['baseline_s']:.0f} s" if "baseline_s" in t else ""),
        f"TensorBoard:       tensorboard --logdir {run_dir / 'tb'}",
        f"plots:             {run_dir / 'loss_curve.png'}, {run_dir / 'confusion_matrix.png'}, "
        f"{run_dir / 'per_class_f1.png'}",
        f"metrics:           {run_dir / 'metrics.json'} (val + test), {run_dir / 'metrics.jsonl'} (per step)",
        f"checkpoint:        {run_dir / 'checkpoints'}",
        f"Hugging Face dir:  {result['export']}",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    run_demo(Path(args.out_dir), classes=args.classes, nproc=args.nproc, overrides=args.overrides,
             baseline=not args.no_baseline)
    return 0
