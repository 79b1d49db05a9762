"""`cic-gpt2 baseline`: fit the classical baselines of `cic_gpt2.trees` on a prepared directory and write
their report (baseline.json, baseline.md, predictions.csv, plots) beside the model's. docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from cic_gpt2.files import atomic_path, check_output, write_text
from cic_gpt2.metrics import compare_markdown, metrics_markdown, row_ids_digest
from cic_gpt2.trees import DEFAULT_JOBS, DEFAULT_MODELS, MODEL_NAMES, BaselineResult, fit_baselines

HELP = "RandomForest / HistGradientBoosting on the prepared train split, scored on the same test rows as the model"


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def _write_predictions(path: Path, results: dict[str, BaselineResult], label_names: list[str]) -> None:
    first = next(iter(results.values()))
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["row_id", "label", *results])
        for i, row_id in enumerate(first.row_ids):
            writer.writerow([int(row_id), label_names[first.y_true[i]], *(label_names[r.y_pred[i]] for r in results.values())])


def write_report(output_dir: str | Path, prepared_dir: str | Path, manifest: dict,
                 results: dict[str, BaselineResult], seed: int) -> dict:
    from cic_gpt2.plots import plot_confusion_matrix, plot_per_class_f1

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    label_names = list(manifest["label_names"])
    first = next(iter(results.values()))
    report = {
        "prepared_dir": str(Path(prepared_dir).resolve()),
        "dataset": {k: manifest.get(k) for k in ("format", "classes", "template", "inputs", "split")},
        "num_features": len(manifest["features"]),
        "split": "test",
        "n": int(first.row_ids.size),
        "row_ids_sha256": row_ids_digest(first.row_ids),
        "seed": seed,
        "models": {
            name: {"metrics": r.metrics, "fit_seconds": round(r.fit_seconds, 3),
                   "predict_seconds": round(r.predict_seconds, 3), "params": r.params}
            for name, r in results.items()
        },
    }
    write_text(out / "baseline.json", json.dumps(report, indent=2) + "\n")
    _write_predictions(out / "predictions.csv", results, label_names)

    header = (
        f"## Baselines on {Path(prepared_dir).name} (test split, n={report['n']}, "
        f"{len(label_names)} classes, {report['num_features']} features, seed {seed})\n\n"
    )
    sections = [header + compare_markdown({n: r.metrics for n, r in results.items()})]
    for name, r in results.items():
        short = next(k for k, v in MODEL_NAMES.items() if v == name)
        sections.append(metrics_markdown(r.metrics, f"{name} — test split"))
        plot_confusion_matrix(r.metrics["confusion_matrix"], label_names, out / f"confusion_matrix_{short}.png",
                              normalize=True, title=f"{name}: confusion matrix (row-normalized, n={r.metrics['n']})")
        plot_per_class_f1(r.metrics, out / f"per_class_f1_{short}.png", title=f"{name}: per-class F1 (test)")
    write_text(out / "baseline.md", "\n".join(sections))
    return report


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="PREPARED_DIR", help="directory written by `cic-gpt2 prepare`")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="where baseline.json, baseline.md, predictions.csv and plots go "
                             "(default: PREPARED_DIR/baseline-seedS)")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty --output")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated: {', '.join(f'{k} ({v})' for k, v in MODEL_NAMES.items())} (default: rf,hgb)")
    parser.add_argument("--seed", type=int, default=0, help="random_state of the models (default: 0)")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help=f"threads (default: {DEFAULT_JOBS})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def default_output(prepared_dir: str | Path, seed: int) -> Path:
    """PREPARED_DIR/baseline-seedS: beside the data it was fitted on (a re-prepare replaces both)."""
    return Path(prepared_dir) / f"baseline-seed{seed}"


def main(args: argparse.Namespace) -> int:
    out = check_output(args.output or default_output(args.data, args.seed), args.overwrite)
    manifest, results = fit_baselines(args.data, args.models, args.seed, args.jobs, progress=not args.no_progress)
    write_report(out, args.data, manifest, results, args.seed)
    print(compare_markdown({name: r.metrics for name, r in results.items()}), end="")
    for name, r in results.items():
        print(f"{name}: fit {r.fit_seconds:.1f}s, predict {r.predict_seconds:.2f}s")
    print(f"test rows: {next(iter(results.values())).row_ids.size} (row ids sha256 "
          f"{row_ids_digest(next(iter(results.values())).row_ids)[:16]}...)")
    print(f"wrote {out / 'baseline.json'}, baseline.md, predictions.csv and plots")
    return 0
