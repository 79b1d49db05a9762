"""`cic-gpt2 evaluate`: metrics of an exported model on a prepared split or on raw CSVs.

    cic-gpt2 evaluate --model runs/demo/export --data data/v2_8 --output runs/demo/eval
    cic-gpt2 evaluate --model runs/demo/export --data data/v2_8 --compare      # + RandomForest / HGB, same rows
    cic-gpt2 evaluate --model runs/demo/export --data new_flows/*.csv --output runs/eval_new
    torchrun --nproc_per_node 4 -m cic_gpt2 evaluate --model runs/demo/export --data data/v2_8

`--data` is a directory written by `cic-gpt2 prepare` (scored on `--split`, default test), or raw CSV
files/directories/globs, which go through exactly the training-time path (`prepare.encode_csvs` with the
export's data manifest: same columns, cell checks, template, tokenizer and label map; rows dropped by those
checks are counted in the report).

Distributed (torchrun / srun / mpirun, see `dist.py`): rows are sorted by token length and cut into
micro-batches once, identically on every rank; each rank scores a contiguous slice of those batches; the
per-row class scores are gathered (each rank's slice is padded to the longest with rows flagged -1, which
are dropped). A row sits in the same batch whatever the world size, so 1 and N processes give the same
numbers. Without a launcher it is one process and no process group. Raw CSVs are encoded by every rank
(deterministic, identical); for large files, `cic-gpt2 prepare` them once and evaluate the prepared split.

Writes to `--output` (rank 0): metrics.json (accuracy, macro/weighted P/R/F1, per-class report, confusion
matrix as counts and row-normalized, OvR ROC-AUC of the softmax of the class scores, loss, the evaluated
rows' id digest), metrics.md, predictions.csv (row_id, label, predicted_label, probability),
confusion_matrix.png (counts), confusion_matrix_normalized.png, per_class_f1.png; with `--compare` also
compare.md / compare.json: the model beside `baseline.run_baselines` on the same prepared test rows
(checked by row-id digest).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from cic_gpt2 import dist
from cic_gpt2.errors import CicError, DataError
from cic_gpt2.files import atomic_path, write_text

HELP = "metrics of an exported model on a prepared split or raw CSVs (JSON, Markdown, plots; --compare baselines)"
DEFAULT_MICRO_BATCH_SIZE = 64
SPLITS = ("train", "val", "test")
# Keys a prepared dataset must share with the model's training data to be scored by it.
_SAME_DATA_KEYS = ("format", "template", "classes", "label_names")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="EXPORT_DIR", help="directory written by train/`cic-gpt2 export`")
    p.add_argument("--data", required=True, nargs="+", metavar="PREPARED_DIR|CSV",
                   help="a `cic-gpt2 prepare` directory, or labelled CSV files/directories/globs")
    p.add_argument("--split", choices=SPLITS, default="test", help="split of a prepared directory (default: test)")
    p.add_argument("--output", default="runs/evaluate", metavar="DIR", help="report directory (default: runs/evaluate)")
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


def prepared_dir_of(data: list[str]) -> Path | None:
    """The prepared directory when --data is one, else None (raw CSVs)."""
    if len(data) == 1 and (Path(data[0]) / "manifest.json").is_file():
        return Path(data[0])
    return None


def check_same_data(prepared: dict, model: dict, prepared_dir: Path) -> None:
    """A prepared dataset must be serialized, tokenized and labelled as the model's training data."""
    for key in _SAME_DATA_KEYS:
        if prepared.get(key) != model.get(key):
            raise DataError(f"{prepared_dir}/manifest.json: {key} {prepared.get(key)!r} differs from the model's "
                            f"training data ({model.get(key)!r}); prepare the data with the model's settings, or "
                            f"pass the raw CSVs as --data")
    fp_data, fp_model = prepared["tokenizer"]["fingerprint"], model["tokenizer"]["fingerprint"]
    if fp_data != fp_model:
        raise DataError(f"{prepared_dir}: tokenizer fingerprint {fp_data} differs from the model's {fp_model}; "
                        f"prepare the data with the model's tokenizer (--tokenizer EXPORT_DIR)")


def load_prepared_rows(prepared_dir: Path, split: str, model_manifest: dict) -> EvalRows:
    import datasets

    from cic_gpt2.baseline import read_manifest

    check_same_data(read_manifest(prepared_dir), model_manifest, prepared_dir)
    split_dir = prepared_dir / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} not found: the prepared directory has no {split!r} split")
    table = datasets.load_from_disk(str(split_dir)).with_format("arrow")[:]  # memory-mapped
    return EvalRows(input_ids=table.column("input_ids"), labels=table.column("label").to_numpy().astype(np.int64),
                    row_ids=table.column("row_id").to_numpy().astype(np.int64),
                    source=f"{prepared_dir} (split {split})", dropped={})


def load_csv_rows(paths: list[str], model_manifest: dict, tokenizer, unknown_labels: str) -> EvalRows:
    from cic_gpt2.predict import check_input
    from cic_gpt2.encode import encode_csvs, expand_inputs

    for path in expand_inputs(paths):
        if not check_input(path, model_manifest, require_label=False):
            raise DataError(f"{path}: no label column ({model_manifest.get('label_column')!r} or 'label'); evaluate "
                            f"needs true labels: use `cic-gpt2 predict` for unlabeled flows")
    input_ids, labels, row_ids, dropped = [], [], [], Counter()
    for chunk in encode_csvs(paths, model_manifest, tokenizer, require_label=True, unknown_labels=unknown_labels):
        input_ids.append(chunk.input_ids)
        labels.append(chunk.labels.astype(np.int64))
        row_ids.append(chunk.row_ids)
        dropped.update(chunk.dropped_reasons)
    if not input_ids or sum(len(a) for a in input_ids) == 0:
        raise DataError(f"no usable rows in {', '.join(paths)} (dropped: {dict(dropped)})")
    return EvalRows(input_ids=pa.chunked_array(input_ids), labels=np.concatenate(labels),
                    row_ids=np.concatenate(row_ids), source=", ".join(paths), dropped=dict(sorted(dropped.items())))


# ================================================================================================ scoring
def rank_batches(batches: list, rank: int, world_size: int) -> list:
    """This rank's contiguous slice of the global batch list."""
    n = len(batches)
    return batches[n * rank // world_size:n * (rank + 1) // world_size]


def gather_scored(local: np.ndarray, info: dist.DistInfo, device) -> np.ndarray:
    """All ranks' [index, scores...] rows; each rank's block is padded to the longest with index -1 rows
    (dropped by the caller). Collective: every rank calls it."""
    if not info.is_distributed:
        return local
    import torch
    import torch.distributed as tdist

    count = torch.tensor([len(local)], dtype=torch.int64, device=device)
    tdist.all_reduce(count, op=tdist.ReduceOp.MAX)
    padded = np.full((int(count.item()), local.shape[1]), -1.0, dtype=np.float64)
    padded[:len(local)] = local
    mine = torch.from_numpy(padded).to(device)
    blocks = [torch.empty_like(mine) for _ in range(info.world_size)]
    tdist.all_gather(blocks, mine)
    return torch.cat(blocks).cpu().numpy()


def score_distributed(classifier, rows: EvalRows, num_labels: int, micro_batch_size: int, device, pad_id: int,
                      max_tokens: int | None, context: int, info: dist.DistInfo, comm_device,
                      progress: bool) -> np.ndarray:
    """Class scores [n, num_labels] (float64) of every row, in row order, from all ranks."""
    from tqdm.auto import tqdm

    from cic_gpt2.predict import length_sorted_batches, row_lengths, score_batches

    lengths = row_lengths(rows.input_ids)
    if max_tokens:
        lengths = np.minimum(lengths, max_tokens)
    too_long = np.flatnonzero(lengths > context)
    if too_long.size:
        raise DataError(f"row id {int(rows.row_ids[too_long[0]])} has {int(lengths[too_long[0]])} tokens, more than "
                        f"the model's context of {context} ({too_long.size} rows in all); train with data.max_length")
    mine = rank_batches(length_sorted_batches(lengths, micro_batch_size), info.rank, info.world_size)
    index = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
    with tqdm(total=len(index), unit=" flows", unit_scale=True, desc="evaluate", dynamic_ncols=True,
              file=sys.stderr, disable=not (progress and info.is_main)) as bar:
        scores = score_batches(classifier, rows.input_ids, mine, device, pad_id, max_tokens, context, bar)
    local = np.zeros((len(index), 1 + num_labels), dtype=np.float64)
    local[:, 0] = index
    if len(index):
        local[:, 1:] = scores
    gathered = gather_scored(local, info, comm_device)
    gathered = gathered[gathered[:, 0] >= 0]
    gathered = gathered[np.argsort(gathered[:, 0], kind="stable")]
    if not np.array_equal(gathered[:, 0].astype(np.int64), np.arange(len(rows.labels))):
        raise CicError(f"evaluation gathered {len(gathered)} rows for {len(rows.labels)}: batch partition bug")
    return gathered[:, 1:]


def metrics_from_scores(scores: np.ndarray, rows: EvalRows, label_names: list[str], split: str) -> dict:
    from cic_gpt2.baseline import row_ids_digest
    from cic_gpt2.metrics import classification_metrics
    from cic_gpt2.plots import normalize_rows
    from cic_gpt2.predict import softmax

    probs = softmax(scores)
    y_pred = probs.argmax(axis=1)
    metrics = classification_metrics(rows.labels, y_pred, label_names, probs=probs)
    metrics["confusion_matrix_normalized"] = normalize_rows(metrics["confusion_matrix"]).round(6).tolist()
    metrics["loss"] = float(-np.mean(np.log(np.maximum(probs[np.arange(len(y_pred)), rows.labels], 1e-300))))
    metrics["split"] = split
    metrics["row_ids_sha256"] = row_ids_digest(rows.row_ids)
    return metrics


# ================================================================================================ report
def write_predictions(path: Path, rows: EvalRows, scores: np.ndarray, label_names: list[str]) -> None:
    import pandas as pd

    from cic_gpt2.predict import softmax

    probs = softmax(scores)
    y_pred = probs.argmax(axis=1)
    names = np.asarray(label_names, dtype=object)
    frame = pd.DataFrame({"row_id": rows.row_ids, "label": names[rows.labels], "predicted_label": names[y_pred],
                          "probability": probs[np.arange(len(y_pred)), y_pred]})
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")


def model_display_name(model_dir: str | Path) -> str:
    import yaml

    path = Path(model_dir) / "run_config.yaml"
    model = ((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("model") or {}) if path.is_file() else {}
    name = Path(str(model.get("name") or Path(model_dir).resolve().name)).name
    return f"GPT-2 {name} ({model['head']})" if model.get("head") else f"GPT-2 {name}"


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
    from cic_gpt2.baseline import run_baselines
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
    from cic_gpt2.metrics import metrics_markdown
    from cic_gpt2.baseline import read_manifest
    from cic_gpt2.predict import export_max_length, load_model, pad_id_of, read_export_manifest, resolve_device

    if args.micro_batch_size < 1:
        raise CicError(f"--micro-batch-size {args.micro_batch_size} must be >= 1")
    prepared_dir = prepared_dir_of(args.data)
    if args.compare and prepared_dir is None:
        raise CicError("--compare fits the baselines on a prepared train split: pass a `cic-gpt2 prepare` "
                       "directory as --data (raw CSVs have no split)")
    if args.compare and args.split != "test":
        raise CicError(f"--compare scores the baselines on the test split; drop --split {args.split}")
    model_manifest = read_export_manifest(args.model)
    if prepared_dir is not None:
        check_same_data(read_manifest(prepared_dir), model_manifest, prepared_dir)
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
        classifier, tokenizer, manifest, context = load_model(args.model, device)
        label_names = list(manifest["label_names"])
        if prepared_dir is not None:
            rows = load_prepared_rows(prepared_dir, args.split, manifest)
        else:
            rows = load_csv_rows(args.data, manifest, tokenizer, args.unknown_labels)
        split = args.split if prepared_dir is not None else "csv"
        scores = score_distributed(classifier, rows, len(label_names), args.micro_batch_size, device, pad_id_of(tokenizer),
                                   export_max_length(args.model), context, info, comm_device, not args.no_progress)
    finally:
        if info.is_distributed:
            dist.destroy()
    if not info.is_main:
        return 0
    # Rank 0 alone from here: reports and baselines, no collectives.
    metrics = metrics_from_scores(scores, rows, label_names, split)
    name = model_display_name(args.model)
    title = f"{name} on {rows.source}"
    out = Path(args.output)
    run_info = {"model": str(Path(args.model).resolve()), "data": rows.source, "split": split,
                "dropped": rows.dropped, "world_size": info.world_size, "device": str(device),
                "micro_batch_size": args.micro_batch_size, "seconds": round(time.perf_counter() - t0, 3)}
    write_report(out, metrics, rows, scores, label_names, run_info, title)
    print(metrics_markdown(metrics, title), end="")
    if rows.dropped:
        print(f"rows dropped by the training-time checks: {rows.dropped}", file=sys.stderr)
    if args.compare:
        print()
        print(compare_with_baselines(out, name, metrics, prepared_dir), end="")
    print(f"wrote {out}/metrics.json, metrics.md, predictions.csv, confusion_matrix.png, "
          f"confusion_matrix_normalized.png, per_class_f1.png" + (", compare.md" if args.compare else ""))
    return 0
