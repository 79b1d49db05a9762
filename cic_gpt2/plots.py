"""PNG plots people look at after a run: confusion matrix, loss curve, per-class F1.

Each is written atomically and scales with the class count; what they show: docs/evaluation.md.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: never try to open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cic_gpt2.errors import DataError  # noqa: E402
from cic_gpt2.files import atomic_path  # noqa: E402
from cic_gpt2.metrics import normalize_rows  # noqa: E402

ANNOTATE_MAX_CLASSES = 12
"""Write the value in each confusion-matrix cell only up to this many classes (beyond, it is clutter)."""


def _save_atomic(fig, path: str | Path, dpi: int = 120) -> Path:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def _tick_fontsize(num_classes: int) -> float:
    return max(6.0, min(10.0, 220.0 / max(num_classes, 1)))


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]] | np.ndarray,
    label_names: Sequence[str],
    path: str | Path,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Heatmap of `cm` (rows = true class, columns = predicted). `normalize=True` shows each row as
    fractions of that class's true rows; False shows raw counts."""
    counts = np.asarray(cm)
    num_classes = len(label_names)
    if counts.shape != (num_classes, num_classes):
        raise DataError(f"confusion matrix has shape {counts.shape} but there are {num_classes} label names")
    values = normalize_rows(counts) if normalize else counts.astype(np.float64)

    side = max(5.0, 0.38 * num_classes + 3.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    vmax = 1.0 if normalize else max(float(values.max()), 1.0)
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "rows")

    fontsize = _tick_fontsize(num_classes)
    ticks = np.arange(num_classes)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels(label_names, rotation=90 if num_classes > 8 else 45, ha="center" if num_classes > 8 else "right",
                       fontsize=fontsize)
    ax.set_yticklabels(label_names, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    n = int(counts.sum())
    ax.set_title(title or (f"Confusion matrix ({'row-normalized' if normalize else 'counts'}, n={n})"))

    if num_classes <= ANNOTATE_MAX_CLASSES:
        for i in range(num_classes):
            for j in range(num_classes):
                v = values[i, j]
                if v == 0:
                    continue
                text = f"{v:.2f}" if normalize else str(int(counts[i, j]))
                ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                        color="white" if v > 0.6 * vmax else "black")
    return _save_atomic(fig, path)


def plot_loss_curve(records: Sequence[Mapping], path: str | Path) -> Path:
    """`loss_curve_figure(records)` written to `path` (PNG)."""
    return _save_atomic(loss_curve_figure(records), path)


def loss_curve_figure(records: Sequence[Mapping]):
    """`train/loss` against optimizer step as a line, `val/loss` as points; with `val/macro_f1` or
    `val/accuracy` in the records, a second panel shows them. Records without a `step` are skipped.
    With no loss recorded at all the figure says so (a run shorter than one log interval). The x axis is
    the run's: from step 0 to the last step any record has, so a single validation point sits where it
    happened in the run, not alone in the middle of an axis matplotlib made up around it."""
    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [(float(r["step"]), float(r[key])) for r in records
               if "step" in r and r.get(key) is not None and math.isfinite(float(r[key]))]
        pts.sort()
        return [p[0] for p in pts], [p[1] for p in pts]

    train_x, train_y = series("train/loss")
    val_x, val_y = series("val/loss")
    quality = {k: series(k) for k in ("val/macro_f1", "val/accuracy")}
    quality = {k: v for k, v in quality.items() if v[0]}

    ncols = 2 if quality else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.5), squeeze=False)
    ax = axes[0][0]
    if train_x:
        ax.plot(train_x, train_y, label="train loss", color="tab:blue", linewidth=1.2,
                marker="." if len(train_x) < 30 else None)
    if val_x:
        ax.plot(val_x, val_y, label="val loss", color="tab:orange", linestyle="--", marker="o")
    if not train_x and not val_x:
        ax.text(0.5, 0.5, "no train/loss or val/loss recorded", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend()
    steps = [float(r["step"]) for r in records if "step" in r and math.isfinite(float(r["step"]))]
    last = max(steps + [1.0])
    margin = 0.02 * last  # so a point on the last step is not cut in half by the frame
    ax.set_xlim(min(0.0, min(steps, default=0.0)) - margin, last + margin)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("Loss")
    ax.grid(True, alpha=0.3)

    if quality:
        qax = axes[0][1]
        for key, (xs, ys) in quality.items():
            qax.plot(xs, ys, marker="o", label=key)
        qax.set_xlabel("optimizer step")
        qax.set_xlim(ax.get_xlim())
        qax.set_ylim(0.0, 1.0)
        qax.set_title("Validation quality")
        qax.legend()
        qax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def plot_per_class_f1(metrics: Mapping, path: str | Path, title: str | None = None) -> Path:
    """Horizontal bar per class (label order): F1, annotated with the class's support; classes with
    no true rows are greyed out."""
    per_class = metrics["per_class"]
    names = list(per_class)
    if not names:
        raise DataError("metrics have no per_class entries to plot")
    f1 = np.array([per_class[n]["f1"] for n in names], dtype=np.float64)
    support = [int(per_class[n]["support"]) for n in names]

    height = max(3.0, 0.32 * len(names) + 1.5)
    fig, ax = plt.subplots(figsize=(8.0, height))
    y = np.arange(len(names))
    colors = ["tab:blue" if s > 0 else "lightgrey" for s in support]
    ax.barh(y, f1, color=colors)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=_tick_fontsize(len(names)))
    ax.invert_yaxis()  # first class at the top, like the confusion matrix
    ax.set_xlim(0.0, 1.12)
    ax.set_xlabel("F1")
    for yi, (v, s) in enumerate(zip(f1, support)):
        ax.text(min(v, 1.0) + 0.01, yi, f"{v:.2f} (n={s})", va="center", fontsize=_tick_fontsize(len(names)))
    macro = metrics.get("macro_f1")
    if macro is not None:
        ax.axvline(macro, color="tab:red", linestyle="--", linewidth=1, label=f"macro-F1 {macro:.3f}")
        ax.legend(loc="lower right")
    ax.set_title(title or f"Per-class F1 (n={sum(support)})")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return _save_atomic(fig, path)
