"""`cic-gpt2 evaluate`: metrics of an exported model on a prepared split or on raw CSVs.

    cic-gpt2 evaluate --model runs/demo --data data/v2_8                  # -> runs/demo/evaluate-v2_8-test/
    cic-gpt2 evaluate --model runs/demo/export --data data/v2_8 --output runs/demo/eval --overwrite
    cic-gpt2 evaluate --model runs/demo/export --data data/v2_8 --compare      # + RandomForest / HGB, same rows
    cic-gpt2 evaluate --model runs/demo/export --data new_flows/*.csv --output runs/eval_new
    torchrun --nproc_per_node 4 -m cic_gpt2 evaluate --model runs/demo/export --data data/v2_8

Rows are scored by `inference.score_distributed` (the path train's validation uses), raw CSVs encoded by
`encode.encode_csvs` with the export's data manifest. Report files and the distributed scheme:
docs/predict.md and docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from cic_gpt2 import dist
from cic_gpt2.errors import CicError, DataError
from cic_gpt2.files import atomic_path, check_output, write_text
from cic_gpt2.prepared import SPLITS, Prepared

HELP = "metrics of an exported model on a prepared split or raw CSVs (JSON, Markdown, plots; --compare baselines)"
DEFAULT_MICRO_BATCH_SIZE = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="EXPORT_DIR|RUN_DIR",
                   help="directory written by `cic-gpt2 export`, or a training run directory (its export/)")
    p.add_argument("--data", required=True, nargs="+", metavar="PREPARED_DIR|CSV",
                   help="a `cic-gpt2 prepare` directory, or labelled CSV files/directories/globs")
    p.add_argument("--split", choices=SPLITS, default="test", help="split of a prepared directory (default: test)")
    p.add_argument("--output", default=None, metavar="DIR",
                   help="report directory (default: RUN_DIR/evaluate-DATA beside the model's export/, DATA = the "
                        "prepared dir's name and split, or the CSV's name; docs/predict.md)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty report directory")
    p.add_argument("--compare", action="store_true",
                   help="also fit RandomForest + HistGradientBoosting on the prepared train split and compare on "
                        "the same test rows")
    p.add_argument("--micro-batch-size", type=int, default=DEFAULT_MICRO_BATCH_SIZE,
                   help=f"rows per forward pass per process (default: {DEFAULT_MICRO_BATCH_SIZE})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: this rank's GPU when CUDA is available, else CPU")
    p.add_argument("--unknown-labels", choices=("error", "drop"), default="error",
                   help="raw CSVs: labels outside the model's classes stop with an error, or drop those rows")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ================================================================================================ data
@dataclass(frozen=True)
class EvalRows:
    """The rows to score: token ids, true class ids and source row ids, in source order."""
    input_ids: pa.ChunkedArray
    labels: np.ndarray  # int64 class ids
    row_ids: np.ndarray  # int64
    source: str  # for reports: "DIR (split test)" or the CSV paths
    dropped: dict  # raw CSVs: prepare's drop reason -> rows
    hashes: np.ndarray | None = None  # raw CSVs: each row's feature-vector hash (encode.feature_hashes)


def load_prepared_rows(prepared: Prepared, split: str, model_manifest: dict) -> EvalRows:
    prepared.check_compatible(model_manifest)
    table = prepared.table(split)  # memory-mapped
    return EvalRows(input_ids=table.column("input_ids"), labels=table.column("label").to_numpy().astype(np.int64),
                    row_ids=table.column("row_id").to_numpy().astype(np.int64),
                    source=f"{prepared.path} (split {split})", dropped={})


def load_csv_rows(paths: list[str], model_manifest: dict, tokenizer, unknown_labels: str) -> EvalRows:
    from cic_gpt2.encode import check_format, encode_csvs, expand_inputs

    for path in expand_inputs(paths):
        if not check_format(path, model_manifest, require_label=False):
            raise DataError(f"{path}: no label column ({model_manifest.get('label_column')!r} or 'label'); evaluate "
                            f"needs true labels: use `cic-gpt2 predict` for unlabeled flows")
    input_ids, labels, row_ids, hashes, dropped = [], [], [], [], Counter()
    for chunk in encode_csvs(paths, model_manifest, tokenizer, require_label=True, unknown_labels=unknown_labels):
        input_ids.append(chunk.input_ids)
        labels.append(chunk.labels.astype(np.int64))
        row_ids.append(chunk.row_ids)
        hashes.append(chunk.hashes)
        dropped.update(chunk.dropped_reasons)
    if not input_ids or sum(len(a) for a in input_ids) == 0:
        raise DataError(f"no usable rows in {', '.join(paths)} (dropped: {dict(dropped)})")
    return EvalRows(input_ids=pa.chunked_array(input_ids), labels=np.concatenate(labels),
                    row_ids=np.concatenate(row_ids), source=", ".join(paths), dropped=dict(sorted(dropped.items())),
                    hashes=np.concatenate(hashes))


def data_name(data: list[str], prepared: Prepared | None, split: str) -> str:
    """What the default report directory is named after: "v2_8-test" (prepared dir, split), "flows" (one CSV
    flows.csv), "flows+2" (flows.csv and two more files)."""
    from cic_gpt2.encode import expand_inputs

    if prepared is not None:
        return f"{Path(prepared.path).resolve().name}-{split}"
    files = expand_inputs(data)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", files[0].stem).strip("_") or "csv"
    return name + (f"+{len(files) - 1}" if len(files) > 1 else "")


# ================================================================================================ report
def write_predictions(path: Path, rows: EvalRows, scores: np.ndarray, label_names: list[str]) -> None:
    import pandas as pd

    from cic_gpt2.inference import softmax

    probs = softmax(scores)
    y_pred = probs.argmax(axis=1)
    names = np.asarray(label_names, dtype=object)
    frame = pd.DataFrame({"row_id": rows.row_ids, "label": names[rows.labels], "predicted_label": names[y_pred],
                          "probability": probs[np.arange(len(y_pred)), y_pred]})
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")


def write_report(out: Path, metrics: dict, rows: EvalRows, scores: np.ndarray, label_names: list[str],
                 context: dict, title: str) -> None:
    from cic_gpt2.metrics import metrics_markdown
    from cic_gpt2.plots import plot_confusion_matrix, plot_per_class_f1

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "metrics.json", json.dumps({**context, "metrics": metrics}, indent=2) + "\n")
    dropped = f"\nRows dropped by the training-time checks: {rows.dropped}\n" if rows.dropped else ""
    write_text(out / "metrics.md", metrics_markdown(metrics, title) + dropped)
    write_predictions(out / "predictions.csv", rows, scores, label_names)
    cm = metrics["confusion_matrix"]
    plot_confusion_matrix(cm, label_names, out / "confusion_matrix.png", normalize=False,
                          title=f"{title}: confusion matrix (counts, n={metrics['n']})")
    plot_confusion_matrix(cm, label_names, out / "confusion_matrix_normalized.png", normalize=True,
                          title=f"{title}: confusion matrix (row-normalized)")
    plot_per_class_f1(metrics, out / "per_class_f1.png", title=f"{title}: per-class F1")


def compare_with_baselines(out: Path, model_name: str, metrics: dict, prepared_dir: Path) -> str:
    """Baselines on the same prepared test rows (row-id digests must agree); writes compare.md/.json."""
    from cic_gpt2.trees import run_baselines
    from cic_gpt2.metrics import compare_markdown

    baselines = run_baselines(prepared_dir)
    for name, m in baselines.items():
        if m["row_ids_sha256"] != metrics["row_ids_sha256"]:
            raise CicError(f"{name} was scored on other rows than the model (row-id digest "
                           f"{m['row_ids_sha256'][:12]} vs {metrics['row_ids_sha256'][:12]}): baseline bug")
    results = {model_name: metrics, **baselines}
    table = (f"## {model_name} vs baselines on {prepared_dir} (test split, n={metrics['n']}, same rows: "
             f"row ids sha256 {metrics['row_ids_sha256'][:16]}...)\n\n" + compare_markdown(results))
    write_text(out / "compare.md", table)
    write_text(out / "compare.json", json.dumps({"prepared_dir": str(prepared_dir), "results": results}, indent=2)
                  + "\n")
    return table


# ================================================================================================ main
def main(args: argparse.Namespace) -> int:
    from cic_gpt2.progress import bar as tqdm  # plain lines, not \r redraws, into a log

    from cic_gpt2.exported import Export
    from cic_gpt2.inference import metrics_from_scores, pad_id_of, resolve_device, score_distributed
    from cic_gpt2.metrics import metrics_markdown

    if args.micro_batch_size < 1:
        raise CicError(f"--micro-batch-size {args.micro_batch_size} must be >= 1")
    prepared = Prepared.load(args.data[0]) if len(args.data) == 1 and Prepared.is_prepared(args.data[0]) else None
    if args.compare and prepared is None:
        raise CicError("--compare fits the baselines on a prepared train split: pass a `cic-gpt2 prepare` "
                       "directory as --data (raw CSVs have no split)")
    if args.compare and args.split != "test":
        raise CicError(f"--compare scores the baselines on the test split; drop --split {args.split}")
    export = Export.open(args.model)
    if prepared is not None:
        prepared.check_compatible(export.manifest)
    # Before any scoring, on every rank alike: a second evaluation never silently replaces the first.
    out = check_output(args.output or export.report_dir(f"evaluate-{data_name(args.data, prepared, args.split)}"),
                       args.overwrite)
    t0 = time.perf_counter()
    info = dist.discover()
    if info.is_distributed:
        dist.init(info)
    try:
        # The collective runs where the backend wants it (nccl: this rank's GPU) even with --device cpu.
        comm_device = dist.device(info)
        if args.device == "cuda":
            resolve_device("cuda")  # one clear error when no GPU is visible
        device = resolve_device("cpu") if args.device == "cpu" else comm_device
        classifier, tokenizer = export.load(device)
        label_names = export.label_names
        if prepared is not None:
            rows = load_prepared_rows(prepared, args.split, export.manifest)
        else:
            rows = load_csv_rows(args.data, export.manifest, tokenizer, args.unknown_labels)
        split = args.split if prepared is not None else "csv"
        with tqdm(total=len(rows.labels), unit=" flows", unit_scale=True, desc="evaluate", dynamic_ncols=True,
                  file=sys.stderr, disable=args.no_progress or not info.is_main) as bar:
            scores = score_distributed(classifier, rows.input_ids, len(label_names), args.micro_batch_size, device,
                                       pad_id_of(tokenizer), export.max_length, classifier.max_row_tokens,
                                       info.rank, info.world_size, comm_device, progress=bar, row_ids=rows.row_ids)
    finally:
        if info.is_distributed:
            dist.destroy()
    if not info.is_main:
        return 0
    # Rank 0 alone from here: reports and baselines, no collectives.
    metrics = metrics_from_scores(scores, rows.labels, rows.row_ids, label_names, split)
    name = export.display_name
    title = f"{name} on {rows.source}"
    run_info = {"model": str(export.path.resolve()), "data": rows.source, "split": split,
                "dropped": rows.dropped, "world_size": info.world_size, "device": str(device),
                "micro_batch_size": args.micro_batch_size, "seconds": round(time.perf_counter() - t0, 3)}
    membership = export.membership() if rows.hashes is not None else None
    if membership is not None:  # raw CSVs: are these flows new to the model?
        seen = int(membership.contains(rows.hashes).sum())
        run_info["seen_in_training"] = {"rows": seen, "of": int(len(rows.hashes)), "fp_rate": membership.fp_rate}
        print(f"evaluate: {seen:,} of {len(rows.hashes):,} evaluated rows have a feature vector that was in the "
              f"model's training split ({membership.kind} set, false-positive rate {membership.fp_rate:.2g})",
              file=sys.stderr)
    write_report(out, metrics, rows, scores, label_names, run_info, title)
    if not args.compare:  # --overwrite: no comparison left over from an earlier run
        for stale in ("compare.md", "compare.json"):
            (out / stale).unlink(missing_ok=True)
    print(metrics_markdown(metrics, title), end="")
    if rows.dropped:
        print(f"rows dropped by the training-time checks: {rows.dropped}", file=sys.stderr)
    if args.compare:
        print()
        print(compare_with_baselines(out, name, metrics, prepared.path), end="")
    print(f"wrote {out}/metrics.json, metrics.md, predictions.csv, confusion_matrix.png, "
          f"confusion_matrix_normalized.png, per_class_f1.png" + (", compare.md" if args.compare else ""))
    return 0
