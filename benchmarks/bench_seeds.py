"""The demo's pipeline repeated over seeds: mean ± std of the test metrics of GPT-2 beside RandomForest and
HistGradientBoosting, all scored on exactly the same test rows of each seed's split.

    python benchmarks/bench_seeds.py                            # seeds 0 1 2, leak-free split (prepare's default)
    python benchmarks/bench_seeds.py --dedup none --seeds 0     # the old leaky random split, for contrast
    python benchmarks/bench_seeds.py --json seeds.json train.epochs=8

Each seed runs the real commands as processes, exactly as a user would: `cic-gpt2 prepare --seed S` on the
bundled real merged-schema sample, `torchrun --nproc_per_node 2 -m cic_gpt2 train` with the demo's recipe
and `train.seed=S` (the model is chosen on validation), `cic-gpt2 baseline --seed S` on the same split.
The seed changes the split, the model's initialisation and data order, and the trees' random_state.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cic_gpt2.demo import DEMO_TRAIN_OVERRIDES, SAMPLE_V2  # noqa: E402
from cic_gpt2.files import free_port  # noqa: E402

METRICS = ("accuracy", "macro_f1", "weighted_f1", "roc_auc_ovr_macro")


def run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}")


def one_seed(work: Path, seed: int, dedup: str, classes: str, overrides: list[str], env: dict) -> dict:
    prepared, run_dir, base_dir = work / f"prepared_{seed}", work / f"run_{seed}", work / f"baseline_{seed}"
    py = [sys.executable, "-m", "cic_gpt2"]
    prepare = [*py, "prepare", str(SAMPLE_V2), "--output", str(prepared), "--classes", classes, "--seed", str(seed),
               "--overwrite"]
    if dedup:
        prepare += ["--dedup", dedup]
    run(prepare, env)
    merged = dict(o.split("=", 1) for o in DEMO_TRAIN_OVERRIDES + [f"train.seed={seed}", "log.progress=false"]
                  + overrides)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "cic_gpt2", "train", "--data", str(prepared),
         "--run-dir", str(run_dir), *(f"{k}={v}" for k, v in merged.items())], env)
    run([*py, "baseline", "--data", str(prepared), "--output", str(base_dir), "--seed", str(seed), "--no-progress"],
        env)
    summary = json.loads((run_dir / "metrics.json").read_text())
    baselines = json.loads((base_dir / "baseline.json").read_text())
    gpt2 = summary["test"]
    if gpt2["row_ids_sha256"] != baselines["row_ids_sha256"]:
        raise SystemExit(f"seed {seed}: GPT-2 and the baselines were scored on different test rows")
    manifest = json.loads((prepared / "manifest.json").read_text())
    return {"seed": seed, "n_test": gpt2["n"], "selected_step": summary.get("selected_step"),
            "dedup": manifest.get("dedup"),
            "models": {"tiny GPT-2": {k: gpt2[k] for k in METRICS},
                       **{name: {k: r["metrics"][k] for k in METRICS} for name, r in baselines["models"].items()}}}


def table(results: list[dict]) -> str:
    names = list(results[0]["models"])
    head = "| model | " + " | ".join(METRICS) + " |\n|---|" + "---:|" * len(METRICS)
    lines = [head]
    for name in names:
        cells = []
        for key in METRICS:
            values = [r["models"][name][key] for r in results]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {std:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--dedup", default="", help="prepare --dedup mode (default: prepare's own default)")
    p.add_argument("--classes", default="8", choices=("8", "34"))
    p.add_argument("--work", default=None, help="working directory (default: a temp dir)")
    p.add_argument("--json", default=None, help="write every seed's figures here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="train overrides on top of the demo's")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = []
        for seed in args.seeds:
            results.append(one_seed(work, seed, args.dedup, args.classes, args.overrides, env))
            r = results[-1]
            print(f"seed {seed}: n_test {r['n_test']}, selected step {r['selected_step']}, " + ", ".join(
                f"{name} macro-F1 {m['macro_f1']:.4f}" for name, m in r["models"].items()), flush=True)
    print(f"\n{len(args.seeds)} seed(s) {args.seeds}, dedup {args.dedup or 'default'}, classes {args.classes}: "
          f"test split, mean ± std (sample std)\n")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
