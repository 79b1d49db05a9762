"""The demo's pipeline repeated over seeds: mean ± std of the test metrics of GPT-2 beside RandomForest and
HistGradientBoosting, all scored on exactly the same test rows of each seed's split.

    python benchmarks/bench_seeds.py                            # seeds 0 1 2, leak-free split (prepare's default)
    python benchmarks/bench_seeds.py --dedup none --seeds 0     # the old leaky random split, for contrast
    python benchmarks/bench_seeds.py --json seeds.json train.epochs=8
    python benchmarks/bench_seeds.py --template compact --config none   # the first round's demo settings

Each seed runs the real commands as processes, exactly as a user would: `cic-gpt2 prepare --seed S` on the
bundled real merged-schema sample, `torchrun --nproc_per_node 2 -m cic_gpt2 train --config cpu_tiny` (the
shipped recipe, configs/cpu_tiny.yaml) with `train.seed=S` (the model is chosen on validation), `cic-gpt2
baseline --seed S` on the same split. The seed changes the split, the model's initialisation and data order,
and the trees' random_state. Validation figures are printed too: settings are compared on those, never on test.
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

from cic_gpt2.demo import RECIPE, SAMPLE_V2  # noqa: E402
from cic_gpt2.files import free_port  # noqa: E402

METRICS = ("accuracy", "macro_f1", "weighted_f1", "roc_auc_ovr_macro")


def run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}")


def one_seed(work: Path, seed: int, dedup: str, classes: str, overrides: list[str], env: dict,
             template: str = "binned", config: str = RECIPE, max_train_rows: int | None = None,
             baselines_on: bool = True, prepare_args: tuple = ()) -> dict:
    prepared, run_dir, base_dir = work / f"prepared_{seed}", work / f"run_{seed}", work / f"baseline_{seed}"
    py = [sys.executable, "-m", "cic_gpt2"]
    prepare = [*py, "prepare", str(SAMPLE_V2), "--output", str(prepared), "--classes", classes, "--seed", str(seed),
               "--template", template, "--overwrite"]
    if dedup:
        prepare += ["--dedup", dedup]
    if max_train_rows:
        prepare += ["--max-train-rows", str(max_train_rows)]
    prepare += list(prepare_args)
    run(prepare, env)
    merged = dict(o.split("=", 1) for o in [f"train.seed={seed}", "log.progress=false"] + overrides)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "cic_gpt2", "train", "--data", str(prepared),
         "--run-dir", str(run_dir), *(["--config", config] if config != "none" else []),
         *(f"{k}={v}" for k, v in merged.items())], env)
    summary = json.loads((run_dir / "metrics.json").read_text())
    gpt2 = summary["test"]
    manifest = json.loads((prepared / "manifest.json").read_text())
    result = {"seed": seed, "n_train": manifest["splits"]["train"]["rows"], "n_test": gpt2["n"],
              "selected_step": summary.get("selected_step"), "val_macro_f1": summary["val"]["macro_f1"],
              "dedup": manifest.get("dedup"), "test_row_ids_sha256": gpt2["row_ids_sha256"],
              "models": {"tiny GPT-2": {k: gpt2[k] for k in METRICS}}}
    if not baselines_on:
        return result
    run([*py, "baseline", "--data", str(prepared), "--output", str(base_dir), "--seed", str(seed), "--no-progress"],
        env)
    baselines = json.loads((base_dir / "baseline.json").read_text())
    if gpt2["row_ids_sha256"] != baselines["row_ids_sha256"]:
        raise SystemExit(f"seed {seed}: GPT-2 and the baselines were scored on different test rows")
    for name, r in baselines["models"].items():
        result["models"][name] = {k: r["metrics"][k] for k in METRICS}
    return result


def mean_std(values: list[float], digits: int = 4) -> str:
    """`mean ± sample std` (std 0 for a single value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def table(results: list[dict]) -> str:
    names = list(results[0]["models"])
    head = "| model | " + " | ".join(METRICS) + " |\n|---|" + "---:|" * len(METRICS)
    lines = [head]
    for name in names:
        cells = [mean_std([r["models"][name][key] for r in results]) for key in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--dedup", default="", help="prepare --dedup mode (default: prepare's own default)")
    p.add_argument("--classes", default="8", choices=("8", "34"))
    p.add_argument("--template", default="binned", help="prepare --template (default binned, the recipe's)")
    p.add_argument("--config", default=RECIPE, help="train --config (default the shipped recipe; none: defaults)")
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
            results.append(one_seed(work, seed, args.dedup, args.classes, args.overrides, env, args.template,
                                    args.config))
            r = results[-1]
            print(f"seed {seed}: n_test {r['n_test']}, selected step {r['selected_step']}, "
                  f"val macro-F1 {r['val_macro_f1']:.4f}; test " + ", ".join(
                f"{name} macro-F1 {m['macro_f1']:.4f}" for name, m in r["models"].items()), flush=True)
    vals = [r["val_macro_f1"] for r in results]
    print(f"\n{len(args.seeds)} seed(s) {args.seeds}, dedup {args.dedup or 'default'}, classes {args.classes}, "
          f"template {args.template}, config {args.config} {' '.join(args.overrides)}: GPT-2 val macro-F1 "
          f"{mean_std(vals)}; "
          f"test split, mean ± std (sample std)\n")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
