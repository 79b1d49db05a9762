"""`cic-gpt2 baseline`: classical classifiers on the same split the language model is scored on.

RandomForest and HistGradientBoosting (scikit-learn) are fitted on the prepared **train** split's
numeric `features` column (the manifest's feature order) and scored on the prepared **test** split:
the very rows, by `row_id`, that `train`/`evaluate` report the model's test metrics on. Metrics come
from `cic_gpt2.metrics.classification_metrics`, ROC-AUC from `predict_proba`, so the two sides of a
comparison are computed by the same code. Hyperparameters are scikit-learn's defaults (the usual
CICIoT2023 baselines), with a fixed `random_state`.

    cic-gpt2 prepare cic_gpt2/data/ciciot2023_v2_39feat_robotumbel_sample.csv --output data/v2_8 --classes 8 --seed 0
    cic-gpt2 baseline --data data/v2_8 --output runs/baseline_v2_8 --models rf,hgb --seed 0

Writes to `--output`: baseline.json (metrics per model, the test rows' ids digest, timings, params),
baseline.md (comparison + per-class tables), predictions.csv (row_id, true label, each model's
prediction; for paired tests such as McNemar's), confusion_matrix_<model>.png, per_class_f1_<model>.png.
`run_baselines()` is the reusable entry point (`evaluate --compare`).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cic_gpt2.errors import CicError, DataError
from cic_gpt2.files import atomic_path, write_text
from cic_gpt2.metrics import classification_metrics, compare_markdown, metrics_markdown
from cic_gpt2.prepared import Prepared

HELP = "RandomForest / HistGradientBoosting on the prepared train split, scored on the same test rows as the model"

# short name (CLI) -> display name (tables, JSON keys)
MODEL_NAMES: dict[str, str] = {"rf": "RandomForest", "hgb": "HistGradientBoosting"}
DEFAULT_MODELS = ("rf", "hgb")
DEFAULT_JOBS = 2
"""Worker threads for fitting/predicting; 2 suits a CI runner or laptop, raise it with --jobs on a node."""
HGB_MIN_ROWS_PER_THREAD = 50_000
"""HistGradientBoosting's OpenMP regions are tiny on small data: on the 3,240-row sample, 2 threads on 2
busy cores took 7-37 s against 1-2 s for one thread. Below this many training rows per thread it runs
on fewer threads."""


@dataclass(frozen=True)
class BaselineResult:
    name: str
    metrics: dict
    row_ids: np.ndarray
    y_true: np.ndarray
    y_pred: np.ndarray
    fit_seconds: float
    predict_seconds: float
    params: dict


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def row_ids_digest(row_ids: Iterable[int]) -> str:
    """sha256 of the row ids (int64, in order): equal digests mean exactly the same rows in the same order."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(row_ids, dtype="<i8")).tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def parse_models(spec: str | Sequence[str]) -> list[str]:
    """`"rf,hgb"` or `["rf"]` -> short names, validated, duplicates removed (order kept)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        key = item.lower()
        if key not in MODEL_NAMES:
            raise CicError(f"--models: unknown model {item!r}; choose from {', '.join(MODEL_NAMES)} (comma-separated)")
        if key not in names:
            names.append(key)
    if not names:
        raise CicError(f"--models is empty; choose from {', '.join(MODEL_NAMES)}")
    return names


def build_estimator(short_name: str, seed: int, jobs: int):
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier

    if short_name == "rf":
        return RandomForestClassifier(random_state=seed, n_jobs=jobs)
    if short_name == "hgb":
        return HistGradientBoostingClassifier(random_state=seed)
    raise CicError(f"unknown baseline model {short_name!r}; choose from {', '.join(MODEL_NAMES)}")


def _full_probs(estimator, features: np.ndarray, num_classes: int) -> np.ndarray:
    """predict_proba's columns cover only the classes seen in training; place them in a [n, C] array
    (classes never seen in training get probability 0)."""
    proba = estimator.predict_proba(features)
    full = np.zeros((features.shape[0], num_classes), dtype=np.float64)
    full[:, estimator.classes_.astype(np.int64)] = proba
    return full


def fit_baselines(
    prepared_dir: str | Path,
    models: str | Sequence[str] = DEFAULT_MODELS,
    seed: int = 0,
    jobs: int = DEFAULT_JOBS,
    progress: bool = False,
) -> tuple[dict, dict[str, BaselineResult]]:
    """Fit each model on the train split, score it on the test split. Returns (manifest, {display name: result})."""
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    short_names = parse_models(models)
    if jobs < 1:
        raise CicError(f"--jobs={jobs} must be >= 1")
    prepared = Prepared.load(prepared_dir)
    manifest, label_names = prepared.manifest, prepared.label_names
    train, test = prepared.feature_split("train"), prepared.feature_split("test")
    if train.labels.size == 0 or test.labels.size == 0:
        raise DataError(f"{prepared_dir}: the train or test split is empty; prepare more rows")

    results: dict[str, BaselineResult] = {}
    bar = tqdm(short_names, desc="baselines", unit="model", disable=not progress)
    for short in bar:
        name = MODEL_NAMES[short]
        bar.set_postfix_str(name)
        threads = jobs if short != "hgb" else max(1, min(jobs, train.labels.size // HGB_MIN_ROWS_PER_THREAD))
        # HistGradientBoosting threads through OpenMP, RandomForest through joblib: cap both.
        with threadpool_limits(limits=threads):
            estimator = build_estimator(short, seed, threads)
            t0 = time.perf_counter()
            estimator.fit(train.features, train.labels)
            t1 = time.perf_counter()
            probs = _full_probs(estimator, test.features, len(label_names))
            y_pred = probs.argmax(axis=1)
            t2 = time.perf_counter()
            metrics = classification_metrics(test.labels, y_pred, label_names, probs=probs)
            results[name] = BaselineResult(
                name=name, metrics=metrics, row_ids=test.row_ids, y_true=test.labels, y_pred=y_pred,
                fit_seconds=t1 - t0, predict_seconds=t2 - t1,
                params={**{k: v for k, v in estimator.get_params().items()
                           if isinstance(v, (int, float, str, bool, type(None)))}, "threads": threads},
            )
    return manifest, results


def run_baselines(
    prepared_dir: str | Path, models: str | Sequence[str] = DEFAULT_MODELS, seed: int = 0, jobs: int = DEFAULT_JOBS
) -> dict[str, dict]:
    """{display name: classification_metrics(...)} of each baseline on the prepared test split. Each
    metrics dict also carries `split` ("test") and `row_ids_sha256` (see `row_ids_digest`)."""
    _, results = fit_baselines(prepared_dir, models, seed, jobs)
    return {name: _metrics_with_rows(r) for name, r in results.items()}


def _metrics_with_rows(result: BaselineResult) -> dict:
    return {**result.metrics, "split": "test", "row_ids_sha256": row_ids_digest(result.row_ids)}


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
    parser.add_argument("--output", default="runs/baseline", metavar="DIR",
                        help="where baseline.json, baseline.md, predictions.csv and plots go (default: runs/baseline)")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated: {', '.join(f'{k} ({v})' for k, v in MODEL_NAMES.items())} (default: rf,hgb)")
    parser.add_argument("--seed", type=int, default=0, help="random_state of the models (default: 0)")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help=f"threads (default: {DEFAULT_JOBS})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    manifest, results = fit_baselines(args.data, args.models, args.seed, args.jobs, progress=not args.no_progress)
    write_report(args.output, args.data, manifest, results, args.seed)
    print(compare_markdown({name: r.metrics for name, r in results.items()}), end="")
    for name, r in results.items():
        print(f"{name}: fit {r.fit_seconds:.1f}s, predict {r.predict_seconds:.2f}s")
    print(f"test rows: {next(iter(results.values())).row_ids.size} (row ids sha256 "
          f"{row_ids_digest(next(iter(results.values())).row_ids)[:16]}...)")
    print(f"wrote {Path(args.output) / 'baseline.json'}, baseline.md, predictions.csv and plots")
    return 0
