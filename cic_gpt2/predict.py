"""`cic-gpt2 predict`: classify the flows of a CSV with an exported model.

    cic-gpt2 predict --model runs/demo/export --input flows.csv --output predictions.csv
    cic-gpt2 predict --model runs/demo --input flows.csv --output predictions.csv     # a run dir: its export/
    cic-gpt2 predict --model runs/demo/export --input flows.csv --output predictions.csv --top-k 3
    cic-gpt2 predict --model runs/demo/export --input big.csv --output p.csv --all-probs --device cuda --batch-size 256

The CSV is streamed through the training-time encode path (`encode.encode_csvs` with the export's data
manifest) and scored by `inference`, as `evaluate` and train's validation are. Output columns and
statuses: docs/predict.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from cic_gpt2.errors import CicError, DataError
from cic_gpt2.files import atomic_path, check_output

HELP = "classify flows in a CSV with an exported model (streamed, row-aligned output)"
DEFAULT_BATCH_SIZE = 64
DEFAULT_CHUNK_ROWS = 20_000
STATUS_OK = "ok"
STATUS_TOO_LONG = "too_long"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="EXPORT_DIR|RUN_DIR",
                   help="directory written by `cic-gpt2 export`, or a training run directory (its export/)")
    p.add_argument("--input", required=True, metavar="FLOWS.csv",
                   help="CSV in the model's format (v1/v2 CICIoT2023 columns, or text); label column optional")
    p.add_argument("--output", required=True, metavar="PREDICTIONS.csv", help="where the predictions go")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--top-k", type=int, default=1, metavar="K", help="also write the K-1 runner-up classes")
    g.add_argument("--all-probs", action="store_true", help="write every class's probability")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per forward pass")
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="CSV rows read per chunk")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs (auto: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ================================================================================================ output
def output_columns(label_names: list[str], top_k: int, all_probs: bool, has_label: bool) -> list[str]:
    cols = ["row_id", "status", "predicted_label", "probability"]
    for k in range(2, top_k + 1):
        cols += [f"label_{k}", f"prob_{k}"]
    if all_probs:
        cols += [f"prob:{name}" for name in label_names]
    if has_label:
        cols.append("true_label")
    return cols


def chunk_frame(chunk, probs: np.ndarray, status: np.ndarray, label_names: list[str], top_k: int,
                all_probs: bool, has_label: bool):
    """One DataFrame row per row read in `chunk` (kept rows with `probs`/`status`, then dropped rows with
    their drop reason and empty predictions), sorted by row id."""
    import pandas as pd

    names = np.asarray(label_names, dtype=object)
    n_kept, n_dropped = len(chunk.row_ids), len(chunk.dropped_row_ids)
    ok = status == STATUS_OK

    def with_empty(kept_values, empty) -> np.ndarray:
        """Kept rows' values (blanked where status is not ok), then `empty` for the dropped rows."""
        dtype = np.float64 if isinstance(empty, float) else object
        out = np.full(n_kept + n_dropped, empty, dtype=dtype)
        out[:n_kept][ok] = np.asarray(kept_values, dtype=dtype)[ok]
        return out

    columns: dict[str, np.ndarray] = {
        "row_id": np.concatenate([chunk.row_ids, chunk.dropped_row_ids]),
        "status": np.concatenate([np.asarray(status, dtype=object), np.asarray(chunk.dropped_reasons, dtype=object)]),
    }
    ranked = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    for k in range(top_k):
        label_col, prob_col = ("predicted_label", "probability") if k == 0 else (f"label_{k + 1}", f"prob_{k + 1}")
        columns[label_col] = with_empty(names[ranked[:, k]], "")
        columns[prob_col] = with_empty(probs[np.arange(n_kept), ranked[:, k]], np.nan)
    if all_probs:
        for j, name in enumerate(label_names):
            columns[f"prob:{name}"] = with_empty(probs[:, j], np.nan)
    if has_label:
        true = np.full(n_kept + n_dropped, "", dtype=object)
        labelled = chunk.labels >= 0
        true[:n_kept][labelled] = names[chunk.labels[labelled]]  # known even for a too_long row
        columns["true_label"] = true
    return pd.DataFrame(columns).sort_values("row_id", kind="stable")


# ================================================================================================ main
def predict_csv(model_dir: str | Path, input_path: str | Path, output_path: str | Path, *, top_k: int = 1,
                all_probs: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
                chunk_rows: int = DEFAULT_CHUNK_ROWS, device: str = "auto", overwrite: bool = False,
                progress: bool = True, loaded=None) -> dict:
    """Write the predictions CSV (docs/predict.md). Returns a summary: {rows, predicted, not_predicted
    {status: n}, seconds, flows_per_s, seen_in_training (rows whose feature vector was in the model's
    training split; None when the export carries no training set)}. `loaded` reuses a `(classifier, tokenizer)` from `Export.load`."""
    from cic_gpt2.progress import bar as tqdm  # plain lines, not \r redraws, into a log

    from cic_gpt2.encode import check_format, encode_csvs, expand_inputs
    from cic_gpt2.exported import Export
    from cic_gpt2.inference import pad_id_of, resolve_device, score_rows, softmax

    if top_k < 1 or batch_size < 1 or chunk_rows < 1:
        raise CicError(f"--top-k ({top_k}), --batch-size ({batch_size}) and --chunk-rows ({chunk_rows}) must be >= 1")
    out = check_output(output_path, overwrite)
    files = expand_inputs([str(input_path)])
    if len(files) != 1 or Path(input_path).is_dir():
        raise DataError(f"--input {input_path}: matches {len(files)} files; give one CSV file")
    input_file = files[0]
    export = Export.open(model_dir)
    manifest, label_names, max_length = export.manifest, export.label_names, export.max_length
    if top_k > len(label_names):
        raise CicError(f"--top-k {top_k} exceeds the model's {len(label_names)} classes")
    has_label = check_format(input_file, manifest, require_label=False)
    torch_device = resolve_device(device)
    classifier, tokenizer = loaded or export.load(torch_device)
    context = classifier.max_row_tokens
    pad_id = pad_id_of(tokenizer)
    columns = output_columns(label_names, top_k, all_probs, has_label)

    not_predicted: Counter = Counter()
    rows = 0
    membership, seen = export.membership(), 0
    t0 = time.perf_counter()
    bar = tqdm(unit=" flows", unit_scale=True, desc="predict", dynamic_ncols=True, file=sys.stderr,
               disable=not progress)
    try:
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(",".join(_csv_quote(c) for c in columns) + "\n")
            for chunk in encode_csvs([input_file], manifest, tokenizer, require_label=False,
                                     chunk_rows=chunk_rows, unknown_labels="drop"):
                lengths = np.minimum(chunk.lengths, max_length) if max_length else chunk.lengths
                fits = lengths <= context
                status = np.where(fits, STATUS_OK, STATUS_TOO_LONG).astype(object)
                probs = np.zeros((len(fits), len(label_names)))
                if fits.any():
                    kept = np.flatnonzero(fits)
                    scores = score_rows(classifier, chunk.input_ids.take(pa.array(kept)), batch_size,
                                        torch_device, pad_id, max_length, context, bar)
                    probs[kept] = softmax(scores)
                frame = chunk_frame(chunk, probs, status, label_names, top_k, all_probs, has_label)
                frame.to_csv(f, header=False, index=False, columns=columns, float_format="%.6g", lineterminator="\n")
                not_predicted.update(s for s in frame["status"] if s != STATUS_OK)
                rows += chunk.rows_read
                if membership is not None:
                    seen += int(membership.contains(chunk.hashes).sum())
                bar.update(chunk.rows_read - int(fits.sum()))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return {"rows": rows, "predicted": rows - sum(not_predicted.values()),
            "not_predicted": dict(sorted(not_predicted.items())), "seconds": seconds,
            "flows_per_s": rows / max(seconds, 1e-9), "output": str(out),
            "seen_in_training": seen if membership is not None else None}


def _csv_quote(text: str) -> str:
    return f'"{text}"' if any(ch in text for ch in ',"\n') else text


def main(args: argparse.Namespace) -> int:
    summary = predict_csv(args.model, args.input, args.output, top_k=args.top_k, all_probs=args.all_probs,
                          batch_size=args.batch_size, chunk_rows=args.chunk_rows, device=args.device,
                          overwrite=args.overwrite, progress=not args.no_progress)
    print(f"predicted {summary['predicted']:,} of {summary['rows']:,} flows in {summary['seconds']:.1f} s "
          f"({summary['flows_per_s']:,.0f} flows/s) -> {summary['output']}")
    if summary["not_predicted"]:
        listed = ", ".join(f"{reason} {n:,}" for reason, n in summary["not_predicted"].items())
        print(f"predict: {sum(summary['not_predicted'].values()):,} row(s) without a prediction ({listed}); "
              f"they are in {summary['output']} with that status and an empty predicted_label", file=sys.stderr)
    if summary["seen_in_training"]:
        print(f"predict: {summary['seen_in_training']:,} row(s) have a feature vector that was in the model's "
              f"training split: they are not new data", file=sys.stderr)
    return 0
