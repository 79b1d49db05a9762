"""`cic-gpt2 predict`: classify the flows of a CSV with an exported model.

    cic-gpt2 predict --model runs/demo/export --input flows.csv --output predictions.csv
    cic-gpt2 predict --model runs/demo/export --input flows.csv --output predictions.csv --top-k 3
    cic-gpt2 predict --model runs/demo/export --input big.csv --output p.csv --all-probs --device cuda --batch-size 256

The CSV is streamed in chunks (`--chunk-rows`) through exactly the training-time path:
`prepare.encode_csvs` with the export's data manifest (same feature columns, cell checks, template and
tokenizer). Inside a chunk, rows are scored in batches of similar token length (less padding) and written
back in input order. The label column is optional; when present it is copied to `true_label`.

Output: one line per input data row, in input order (row-aligned with the input):
  row_id           0-based data-row index in the input (header not counted)
  status           `ok`, or why the row got no prediction: non_numeric | nan | inf | missing_label |
                   unknown_label | repeated_header (prepare's drop reasons) | too_long (more tokens than
                   the model's context)
  predicted_label  the arg-max class (empty unless status is ok)
  probability      its softmax probability over the class scores
  label_2, prob_2 ... label_K, prob_K   with --top-k K (K >= 2): runners-up, best first
  prob:<class>     with --all-probs: every class's probability, in the model's label order
  true_label       only when the input has a label column
The file is written under a temporary name and renamed when complete; a summary of the rows without a
prediction goes to stderr.

The scoring helpers here (`length_sorted_batches`, `pad_batch`, `score_batches`, `load_model`) are shared
with `cic-gpt2 evaluate`, so both commands turn token ids into class scores the same way.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from cic_gpt2.errors import CicError, DataError

HELP = "classify flows in a CSV with an exported model (streamed, row-aligned output)"
DEFAULT_BATCH_SIZE = 64
DEFAULT_CHUNK_ROWS = 20_000
STATUS_OK = "ok"
STATUS_TOO_LONG = "too_long"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="EXPORT_DIR", help="directory written by train/`cic-gpt2 export`")
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


# ================================================================================================ model
def resolve_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise CicError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def export_max_length(model_dir: str | Path) -> int | None:
    """data.max_length the model was trained with (train truncates to it), from the export's run_config.yaml."""
    import yaml

    path = Path(model_dir) / "run_config.yaml"
    if not path.is_file():
        return None
    data = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("data") or {}
    return data.get("max_length")


def read_export_manifest(model_dir: str | Path) -> dict:
    """The export's data manifest (cheap: read before loading weights, to check inputs first)."""
    import json

    path = Path(model_dir) / "data_manifest.json"
    if not path.is_file():
        raise CicError(f"{model_dir}: not an exported model (no data_manifest.json); pass the export/ directory "
                       f"of a run or the output of `cic-gpt2 export`")
    return json.loads(path.read_text(encoding="utf-8"))


def load_model(model_dir: str | Path, device):
    """(classifier in eval mode on `device`, tokenizer, data manifest, token limit per row).

    The token limit is the model's context (n_positions); rows longer than data.max_length (when the run
    set one) are truncated to it first, as in training."""
    read_export_manifest(model_dir)
    from transformers.utils import logging as hf_logging

    from cic_gpt2.export import load_export

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per run is noise next to our own
    try:
        classifier, tokenizer, manifest = load_export(str(model_dir))
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    classifier.to(device).eval()
    return classifier, tokenizer, manifest, _context_size(classifier)


def _context_size(classifier) -> int:
    """Most row tokens one forward pass takes: the positions, less the prompt and answer of the causal-lm head."""
    config = classifier.hf_model.config
    positions = int(getattr(config, "n_positions", None) or config.max_position_embeddings)
    if getattr(classifier, "head", "seqcls") == "causal-lm":
        positions -= len(classifier.prefix_ids) + len(classifier.suffix_ids) + classifier.max_fed
    return positions


def pad_id_of(tokenizer) -> int:
    # Training pads with eos (right padding); seqcls reads the last non-pad token, which this keeps intact.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ================================================================================================ scoring
def row_lengths(input_ids) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_value_length(input_ids).to_numpy(zero_copy_only=False).astype(np.int64)


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Row indices grouped into batches of similar length (stable sort: the same rows give the same batches)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(rows, pad_id: int, max_tokens: int | None = None, multiple_of: int = 8, max_width: int | None = None):
    """Token-id rows (pyarrow list array) -> right-padded int64 ids [b, L] and attention mask [b, L],
    L = the longest row (first `max_tokens` of each) rounded up to `multiple_of`, at most `max_width`
    (the model's context; rows are never longer)."""
    if isinstance(rows, pa.ChunkedArray):
        rows = rows.combine_chunks()
    offsets = rows.offsets.to_numpy()
    values = rows.values.to_numpy(zero_copy_only=False)
    starts, lengths = offsets[:-1], np.diff(offsets)
    if max_tokens is not None:
        lengths = np.minimum(lengths, max_tokens)
    width = max(1, int(lengths.max(initial=1)))
    width = max(width, min(-(-width // multiple_of) * multiple_of, max_width or np.iinfo(np.int64).max))
    positions = np.arange(width)
    mask = positions[None, :] < lengths[:, None]
    ids = np.full((len(lengths), width), pad_id, dtype=np.int64)
    ids[mask] = values[(starts[:, None] + positions[None, :])[mask]]
    return ids, mask.astype(np.int64)


def score_batches(classifier, input_ids, batches: list[np.ndarray], device, pad_id: int,
                  max_tokens: int | None = None, max_width: int | None = None, progress=None) -> np.ndarray:
    """Class scores (float32 [sum of batch sizes, num_labels]) of the rows of `batches`, in that order."""
    import torch

    scores = []
    with torch.inference_mode():
        for index in batches:
            ids, mask = pad_batch(input_ids.take(pa.array(index)), pad_id, max_tokens, max_width=max_width)
            out = classifier(input_ids=torch.from_numpy(ids).to(device),
                             attention_mask=torch.from_numpy(mask).to(device))
            scores.append(out.logits.float().cpu().numpy())
            if progress is not None:
                progress.update(len(index))
    if not scores:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(scores)


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores.astype(np.float64) - scores.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def score_rows(classifier, input_ids, batch_size: int, device, pad_id: int, max_tokens: int | None = None,
               max_width: int | None = None, progress=None) -> np.ndarray:
    """Class scores of every row of `input_ids`, in row order (batched by length internally)."""
    batches = length_sorted_batches(np.minimum(row_lengths(input_ids), max_tokens or np.iinfo(np.int64).max),
                                    batch_size)
    sorted_scores = score_batches(classifier, input_ids, batches, device, pad_id, max_tokens, max_width, progress)
    scores = np.empty_like(sorted_scores)
    if len(batches):
        scores[np.concatenate(batches)] = sorted_scores
    return scores


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


def check_input(path: Path, manifest: dict, require_label: bool) -> bool:
    """The input's CSV format must be the model's training format; returns whether it has a label column."""
    from cic_gpt2.prepare import resolve_layout

    fmt, layout = resolve_layout(path, manifest.get("label_column"), require_label=require_label)
    if fmt != manifest["format"]:
        raise DataError(f"{path}: a {fmt} CSV, but the model was trained on {manifest['format']} rows "
                        f"({len(manifest['features'])} features); score it with a model trained on {fmt} data")
    return layout.label_column is not None


# ================================================================================================ main
def predict_csv(model_dir: str | Path, input_path: str | Path, output_path: str | Path, *, top_k: int = 1,
                all_probs: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
                chunk_rows: int = DEFAULT_CHUNK_ROWS, device: str = "auto", overwrite: bool = False,
                progress: bool = True, loaded=None) -> dict:
    """Write the predictions CSV (see the module docstring). Returns a summary:
    {rows, predicted, not_predicted {status: n}, seconds, flows_per_s}. `loaded` reuses a `load_model` result."""
    from tqdm.auto import tqdm

    from cic_gpt2.encode import encode_csvs, expand_inputs

    if top_k < 1 or batch_size < 1 or chunk_rows < 1:
        raise CicError(f"--top-k ({top_k}), --batch-size ({batch_size}) and --chunk-rows ({chunk_rows}) must be >= 1")
    out = Path(output_path)
    if out.exists() and not overwrite:
        raise CicError(f"{out} already exists; pass --overwrite to replace it, or choose another --output")
    files = expand_inputs([str(input_path)])
    if len(files) != 1 or Path(input_path).is_dir():
        raise DataError(f"--input {input_path}: matches {len(files)} files; give one CSV file")
    input_file = files[0]
    torch_device = resolve_device(device)
    classifier, tokenizer, manifest, context = loaded or load_model(model_dir, torch_device)
    label_names = list(manifest["label_names"])
    if top_k > len(label_names):
        raise CicError(f"--top-k {top_k} exceeds the model's {len(label_names)} classes")
    max_length = export_max_length(model_dir)
    pad_id = pad_id_of(tokenizer)
    has_label = check_input(input_file, manifest, require_label=False)
    columns = output_columns(label_names, top_k, all_probs, has_label)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    not_predicted: Counter = Counter()
    rows = 0
    t0 = time.perf_counter()
    bar = tqdm(unit=" flows", unit_scale=True, desc="predict", dynamic_ncols=True, file=sys.stderr,
               disable=not progress)
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
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
                bar.update(chunk.rows_read - int(fits.sum()))
        os.replace(tmp, out)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    return {"rows": rows, "predicted": rows - sum(not_predicted.values()),
            "not_predicted": dict(sorted(not_predicted.items())), "seconds": seconds,
            "flows_per_s": rows / max(seconds, 1e-9), "output": str(out)}


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
    return 0
