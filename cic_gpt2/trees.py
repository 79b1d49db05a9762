"""Classical baselines: RandomForest and HistGradientBoosting fitted on a prepared train split's numeric
features and scored, by the shared `cic_gpt2.metrics`, on exactly the test rows the language model is scored on.
Used by `cic-gpt2 baseline`, `evaluate --compare` and `demo`. Rows, features, models: docs/evaluation.md."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cic_gpt2.errors import CicError, DataError
from cic_gpt2.metrics import classification_metrics, row_ids_digest
from cic_gpt2.prepared import Prepared

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
    """One fitted model: its test-split metrics, the scored rows and predictions, timings and parameters."""

    name: str
    metrics: dict
    row_ids: np.ndarray
    y_true: np.ndarray
    y_pred: np.ndarray
    fit_seconds: float
    predict_seconds: float
    params: dict


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------
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
    from cic_gpt2.progress import bar as tqdm  # plain lines, not \r redraws, into a log

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
