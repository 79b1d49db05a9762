"""Learning curve: test macro-F1 against the number of training rows, the shipped recipe beside RandomForest
and HistGradientBoosting, every point on the same validation/test rows of its seed's leak-free split.

    python benchmarks/bench_learning_curve.py                       # 250 500 1000 2000 all, seeds 0 1 2
    python benchmarks/bench_learning_curve.py --rows 500 0 --seeds 0 --png curve.png --json curve.json

A point runs the real commands (benchmarks/bench_seeds.py `one_seed`): `cic-gpt2 prepare --seed S
--max-train-rows N` (the same split, then a seeded stratified N of its training rows: validation and test
are untouched, checked by their row-id hash), 2-rank training with `--config cpu_tiny`, `cic-gpt2 baseline`
on that train split. `0` means every training row (3,265 of the bundled sample's 4,050 for 8 classes). The
bundled sample is small: the curve ends there (resampling real rows would only duplicate them, and the
leak-free split keeps duplicates together, so it would add no information).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_seeds import ROOT, one_seed  # noqa: E402


def _keys(points: list[dict]) -> list[int]:
    """Requested sizes in increasing order, 0 (every training row) last."""
    return sorted({p["requested_rows"] for p in points}, key=lambda n: (n == 0, n))


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in points[0]["models"]:
        xs, means, stds = [], [], []
        for n in _keys(points):
            group = [p for p in points if p["requested_rows"] == n]
            vals = [p["models"][name]["macro_f1"] for p in group]
            xs.append(statistics.mean(p["n_train"] for p in group))
            means.append(statistics.mean(vals))
            stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training rows (stratified subset of the train split)")
    ax.set_ylabel("test macro-F1 (mean ± std over seeds)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[250, 500, 1000, 2000, 0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--classes", default="8", choices=("8", "34"))
    p.add_argument("--png", default="docs/learning_curve.png")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    points, test_rows = [], {}
    for seed in args.seeds:
        for n in args.rows:
            with tempfile.TemporaryDirectory() as tmp:
                r = one_seed(Path(tmp), seed, "", args.classes, [], env, max_train_rows=n or None)
            if test_rows.setdefault(seed, r["test_row_ids_sha256"]) != r["test_row_ids_sha256"]:
                raise SystemExit(f"seed {seed}: --max-train-rows {n} changed the test rows")
            r["requested_rows"] = n
            points.append(r)
            print(f"seed {seed} train rows {r['n_train']}: " + ", ".join(
                f"{name} {m['macro_f1']:.4f}" for name, m in r["models"].items()), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(points, indent=2) + "\n")
    print("\n| training rows | " + " | ".join(points[0]["models"]) + " |\n|---:|" + "---:|" * len(points[0]["models"]))
    for n in _keys(points):
        group = [p for p in points if p["requested_rows"] == n]
        cells = []
        for name in points[0]["models"]:
            vals = [p["models"][name]["macro_f1"] for p in group]
            cells.append(f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.3f}")
        rows = sorted({p["n_train"] for p in group})
        print(f"| {rows[0]}{f'–{rows[-1]}' if len(rows) > 1 else ''} | " + " | ".join(cells) + " |")
    plot(points, Path(args.png), f"bundled CICIoT2023 sample, {args.classes} classes, leak-free split, "
         f"seeds {' '.join(map(str, args.seeds))}")
    print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
