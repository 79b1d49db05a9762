"""Classification metrics shared by train (val/test), evaluate and baseline, so every number in a
report is computed the same way.

`classification_metrics` (plain JSON-serializable Python), `metrics_markdown`, `compare_markdown`,
`row_ids_digest`. Keys and averaging conventions: docs/evaluation.md ("Metrics").
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Mapping, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from cic_gpt2.errors import DataError



def row_ids_digest(row_ids: Iterable[int]) -> str:
    """sha256 of the row ids (int64, in order): equal digests mean exactly the same rows in the same order."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(row_ids, dtype="<i8")).tobytes()).hexdigest()


def normalize_rows(cm) -> np.ndarray:
    """Each row divided by its sum (recall on the diagonal); rows of a class with no true rows stay 0."""
    cm = np.asarray(cm, dtype=np.float64)
    sums = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, sums, out=np.zeros_like(cm), where=sums > 0)


OVERALL_KEYS = (
    "accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "weighted_precision",
    "weighted_recall",
    "weighted_f1",
    "roc_auc_ovr_macro",
)


def _as_label_array(values, name: str, num_classes: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{name} must be a 1-D sequence of class ids, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        if arr.dtype.kind != "f" or not np.all(np.equal(np.mod(arr, 1), 0)):
            raise DataError(f"{name} must hold integer class ids (map label names through label2id), got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{name}[{i}]={int(arr[i])} is not a class id in [0, {num_classes}); "
            "drop unlabeled rows (label -1) before computing metrics"
        )
    return arr


def roc_auc_ovr_macro(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    """One-vs-rest ROC-AUC averaged over the classes present in `y_true`; None when undefined."""
    present = np.unique(y_true)
    if len(present) < 2:
        return None
    aucs = [roc_auc_score(y_true == c, probs[:, c]) for c in present]
    return float(np.mean(aucs))


def classification_metrics(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    label_names: Sequence[str],
    probs: Sequence[Sequence[float]] | np.ndarray | None = None,
) -> dict:
    """Accuracy, macro/weighted precision/recall/F1, per-class report, confusion matrix (rows = true,
    columns = predicted, in `label_names` order), OvR macro ROC-AUC (None when undefined) and `n`."""
    label_names = [str(n) for n in label_names]
    num_classes = len(label_names)
    if num_classes == 0:
        raise DataError("label_names is empty; metrics need at least one class")
    if len(set(label_names)) != num_classes:
        raise DataError(f"label_names has duplicates: {label_names}")
    y_true_arr = _as_label_array(y_true, "y_true", num_classes)
    y_pred_arr = _as_label_array(y_pred, "y_pred", num_classes)
    if y_true_arr.shape != y_pred_arr.shape:
        raise DataError(f"y_true has {y_true_arr.size} rows but y_pred has {y_pred_arr.size}")
    n = int(y_true_arr.size)
    if n == 0:
        raise DataError("no rows to evaluate (empty y_true)")

    all_labels = list(range(num_classes))
    prec, rec, f1, support = precision_recall_fscore_support(
        y_true_arr, y_pred_arr, labels=all_labels, zero_division=0
    )
    cm = confusion_matrix(y_true_arr, y_pred_arr, labels=all_labels)

    occurring = np.union1d(y_true_arr, y_pred_arr)  # classes the macro averages are over
    weights = support / support.sum()

    auc = None
    if probs is not None:
        probs_arr = np.asarray(probs, dtype=np.float64)
        if probs_arr.shape != (n, num_classes):
            raise DataError(f"probs has shape {probs_arr.shape}, expected ({n}, {num_classes}) (rows x classes)")
        if not np.isfinite(probs_arr).all():
            raise DataError("probs contains NaN or infinite values")
        auc = roc_auc_ovr_macro(y_true_arr, probs_arr)

    return {
        "n": n,
        "accuracy": float(np.mean(y_true_arr == y_pred_arr)),
        "macro_precision": float(np.mean(prec[occurring])),
        "macro_recall": float(np.mean(rec[occurring])),
        "macro_f1": float(np.mean(f1[occurring])),
        "macro_classes": int(len(occurring)),
        "weighted_precision": float(np.sum(prec * weights)),
        "weighted_recall": float(np.sum(rec * weights)),
        "weighted_f1": float(np.sum(f1 * weights)),
        "roc_auc_ovr_macro": auc,
        "per_class": {
            name: {
                "precision": float(prec[i]),
                "recall": float(rec[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": [[int(v) for v in row] for row in cm],
        "label_names": label_names,
    }


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def metrics_markdown(metrics: Mapping, title: str = "Metrics") -> str:
    """Overall table + per-class table, ready to paste into a paper draft or README."""
    lines = [f"### {title}", "", "| metric | value |", "|---|---:|"]
    lines.append(f"| rows (n) | {metrics['n']} |")
    for key in OVERALL_KEYS:
        lines.append(f"| {key} | {_fmt(metrics.get(key))} |")
    if "macro_classes" in metrics:
        lines.append(f"| classes in macro average | {metrics['macro_classes']} |")
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, row in metrics["per_class"].items():
        lines.append(
            f"| {_md_escape(name)} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | "
            f"{_fmt(row['f1'])} | {row['support']} |"
        )
    return "\n".join(lines) + "\n"


COMPARE_COLUMNS = (
    ("accuracy", "accuracy"),
    ("macro-F1", "macro_f1"),
    ("weighted-F1", "weighted_f1"),
    ("macro-P", "macro_precision"),
    ("macro-R", "macro_recall"),
    ("ROC-AUC (OvR macro)", "roc_auc_ovr_macro"),
    ("n", "n"),
)


def compare_markdown(results: Mapping[str, Mapping]) -> str:
    """One row per model (`{name: metrics}`, insertion order kept), the headline metrics side by side."""
    if not results:
        raise DataError("nothing to compare: no metrics given")
    header = "| model | " + " | ".join(h for h, _ in COMPARE_COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COMPARE_COLUMNS)
    rows = [
        f"| {_md_escape(name)} | " + " | ".join(_fmt(m.get(key)) for _, key in COMPARE_COLUMNS) + " |"
        for name, m in results.items()
    ]
    return "\n".join([header, rule, *rows]) + "\n"
