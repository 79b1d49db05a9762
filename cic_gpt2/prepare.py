"""`cic-gpt2 prepare INPUT... --output DIR`: CICIoT2023 CSVs -> text -> GPT-2 token ids -> sharded Arrow splits.

    cic-gpt2 prepare data/part-*.csv --output prepared/ --classes 8 --template compact
    cic-gpt2 prepare Merged01.csv Merged02.csv --output prepared/ --max-per-class 200000 --overwrite

Builds a prepared directory from rows encoded by `encode.py`: the stratified split, the shards, manifest.json.
Flags, formats, output layout and how it scales: docs/prepare.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from cic_gpt2 import __version__
from cic_gpt2 import binning, schema, splits
from cic_gpt2.encode import (DEFAULT_CHUNK_ROWS, FEATURE_HASH, TEXT_HASH, EncodedChunk, InputSpec, expand_inputs,
                             resolve_layouts, stream_chunks, unknown_label_error)
from cic_gpt2.errors import DataError
from cic_gpt2.files import replace_dir
from cic_gpt2.prepared import TRAIN_HASHES
from cic_gpt2.templates import TEMPLATES, TEXT_TEMPLATE

HELP = "CICIoT2023 CSVs -> serialized, tokenized, sharded Arrow splits + manifest.json"
SPLITS = ("train", "val", "test")
SHARD_BYTES = 256 << 20
SMALL_INPUT_BYTES = 16 << 20
# Columns of the temporary rows file and of every split's shards.
ROW_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("label", pa.int32()), ("length", pa.int32()),
                        ("row_id", pa.int64()), ("features", pa.list_(pa.float32()))])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="CSV files, directories (their *.csv) or globs")
    p.add_argument("--output", "-o", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--classes", choices=schema.CLASSES_CHOICES, default="34",
                   help="label taxonomy: 34 classes, 8 official groups, 2 (Benign/Attack) or raw labels as written")
    p.add_argument("--template", choices=TEMPLATES, default="compact", help="row -> text serialization")
    p.add_argument("--bins", type=int, default=None, metavar="N",
                   help="template binned: quantile bins per feature, fitted on the training split (default 32)")
    p.add_argument("--label-column", default=None, help="label column name (default: the column named label, any case)")
    p.add_argument("--unknown-labels", choices=("error", "drop"), default="error",
                   help="labels outside the taxonomy: stop with an error listing them, or drop those rows")
    p.add_argument("--small-classes", choices=("error", "drop"), default="drop",
                   help="classes with fewer rows than splits (3): drop their rows with a warning naming them "
                        "(default), or stop with an error")
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions (default 0.8,0.1,0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split and the per-class cap")
    p.add_argument("--max-train-rows", type=int, default=None, metavar="N",
                   help="keep a seeded stratified N of the training split (val/test unchanged): learning curves")
    p.add_argument("--max-per-class", type=int, default=None, metavar="N",
                   help="keep at most N rows of each class (random, seeded) before splitting")
    p.add_argument("--dedup", choices=splits.MODES, default="group",
                   help="rows with identical feature vectors: group = always in the same split (stratified over "
                        "vectors), drop = keep the first row per (vector, label), none = split rows ignoring it")
    p.add_argument("--tokenizer", default=None, help="tokenizer/model dir (default: the bundled GPT-2 BPE)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes serializing+tokenizing chunks (1 = in this process)")
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows per streamed CSV chunk")
    p.add_argument("--num-shards", type=int, default=None, help="Arrow shards per split (default: ~256 MiB each)")


# ================================================================================================ split
def parse_split(text: str) -> tuple[float, float, float]:
    try:
        ratios = tuple(float(x) for x in text.split(","))
    except ValueError:
        ratios = ()
    if len(ratios) != 3 or min(ratios) < 0 or ratios[0] <= 0 or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise DataError(f"--split {text!r}: give three fractions train,val,test that sum to 1, e.g. 0.8,0.1,0.1")
    return ratios  # type: ignore[return-value]


# ================================================================================================ output
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _chunk_batch(chunk: EncodedChunk, labels: np.ndarray) -> pa.RecordBatch:
    n, f = chunk.features.shape
    features = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * f),
                                        pa.array(chunk.features.reshape(-1), type=pa.float32()))
    return pa.record_batch([chunk.input_ids, pa.array(labels, pa.int32()), pa.array(chunk.lengths, pa.int32()),
                            pa.array(chunk.row_ids, pa.int64()), features], schema=ROW_SCHEMA)


def _save_split(stream_dir: Path, out_dir: Path, shard_files: list[Path]) -> None:
    """Each shard file -> datasets save_to_disk (one at a time: bounded memory), assembled as one dataset."""
    import datasets

    out_dir.mkdir(parents=True)
    n = len(shard_files)
    state = info = None
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # our own bar covers the run; one bar per shard would flood stderr
    try:
        for k, shard in enumerate(shard_files):
            ds = datasets.Dataset.from_file(str(shard))
            tmp = stream_dir / f"save-{k}"
            ds.save_to_disk(str(tmp), num_shards=1)
            del ds
            (tmp / "data-00000-of-00001.arrow").rename(out_dir / f"data-{k:05d}-of-{n:05d}.arrow")
            if state is None:
                state = json.loads((tmp / "state.json").read_text())
                info = (tmp / "dataset_info.json").read_text()
            shutil.rmtree(tmp)
            shard.unlink()
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    state["_data_files"] = [{"filename": f"data-{k:05d}-of-{n:05d}.arrow"} for k in range(n)]
    (out_dir / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    (out_dir / "dataset_info.json").write_text(info)


def _binned_rerender(bins: dict, names: list[str], tokenizer):
    """batch -> batch with input_ids/length of the binned texts of its features (prepare's second pass)."""
    from cic_gpt2.tokenizer import WordEncoder

    encoder = WordEncoder(tokenizer)

    def rerender(batch: pa.RecordBatch) -> pa.RecordBatch:
        values = batch.column(4).flatten().to_numpy().reshape(batch.num_rows, len(names))
        flat, offsets = encoder.encode(binning.render(values, names, bins))
        ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat, type=pa.int32()))
        return batch.set_column(0, "input_ids", ids).set_column(2, "length", pa.array(np.diff(offsets), pa.int32()))
    return rerender


def _write_splits(rows_path: Path, work: Path, out: Path, split_code: np.ndarray, label_map: np.ndarray,
                  num_shards: int | None, rerender=None) -> np.ndarray:
    """Route the temporary rows into per-split shard files, save them; return the token-length histogram.
    `rerender`: batch -> batch with new input_ids/length (template binned: tokenized once the edges exist)."""
    total_bytes = rows_path.stat().st_size
    bytes_per_row = total_bytes / max(1, len(split_code))
    rows_per_split = [int((split_code == s).sum()) for s in range(3)]
    shards = [max(1, min(r, num_shards or math.ceil(r * bytes_per_row / SHARD_BYTES))) for r in rows_per_split]
    per_shard = [math.ceil(r / k) if r else 0 for r, k in zip(rows_per_split, shards)]
    files: list[list[Path]] = [[] for _ in SPLITS]
    writers: list = [None, None, None]
    in_shard = [0, 0, 0]
    length_hist = np.zeros(1, dtype=np.int64)

    def write(s: int, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            if writers[s] is None or in_shard[s] >= per_shard[s]:
                if writers[s] is not None:
                    writers[s].close()
                files[s].append(work / f"{SPLITS[s]}-{len(files[s]):05d}.arrow")
                writers[s], in_shard[s] = pa.ipc.new_stream(str(files[s][-1]), ROW_SCHEMA), 0
            take = min(batch.num_rows, per_shard[s] - in_shard[s])
            writers[s].write_batch(batch.slice(0, take))
            in_shard[s] += take
            batch = batch.slice(take)

    pos = 0
    with pa.OSFile(str(rows_path), "rb") as f:  # plain reads, not mmap: RSS stays at one batch
        for batch in pa.ipc.open_stream(f):
            code = split_code[pos:pos + batch.num_rows]
            pos += batch.num_rows
            batch = batch.set_column(1, "label", pa.array(label_map[batch.column(1).to_numpy()], pa.int32()))
            kept = code >= 0
            if rerender is not None:
                batch = batch.filter(pa.array(kept))
                code = code[kept]
                kept = np.ones(len(code), dtype=bool)
                batch = rerender(batch)
            lengths = batch.column(2).to_numpy()[kept]
            if len(lengths):
                hist = np.bincount(lengths)
                if len(hist) > len(length_hist):
                    length_hist = np.pad(length_hist, (0, len(hist) - len(length_hist)))
                length_hist[:len(hist)] += hist
            for s in range(3):
                mask = code == s
                if mask.any():
                    write(s, batch.filter(pa.array(mask)))
    for s in range(3):
        if writers[s] is not None:
            writers[s].close()
        if not files[s]:  # an empty split still gets a loadable (empty) dataset
            files[s].append(work / f"{SPLITS[s]}-00000.arrow")
            with pa.ipc.new_stream(str(files[s][-1]), ROW_SCHEMA):
                pass
        _save_split(work, out / SPLITS[s], files[s])
    return length_hist


def _percentile_from_hist(hist: np.ndarray, q: float) -> int:
    cum = np.cumsum(hist)
    return int(np.searchsorted(cum, q / 100 * cum[-1])) if cum[-1] else 0


# ================================================================================================ main
def main(args: argparse.Namespace) -> int:
    from cic_gpt2.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    ratios = parse_split(args.split)
    if args.max_per_class is not None and args.max_per_class < splits.min_rows_per_class(ratios):
        raise DataError(f"--max-per-class {args.max_per_class}: must be >= {splits.min_rows_per_class(ratios)} "
                        f"(one row per split)")
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it, or choose another --output")
    files = expand_inputs(args.inputs)
    fmt, layouts = resolve_layouts(files, args.label_column, require_label=True)
    for layout in layouts:
        if layout.ignored:
            print(f"warning: {layout.path}: ignoring columns not used by the {fmt} format: "
                  f"{', '.join(layout.ignored)}", file=sys.stderr)
    if args.template != binning.TEMPLATE and args.bins is not None:
        raise DataError(f"--bins is for --template binned (got --template {args.template})")
    if args.template == binning.TEMPLATE and args.tokenizer:
        raise DataError("--template binned builds its own word-level tokenizer from the bin edges; drop --tokenizer")
    tok = load_tokenizer(args.tokenizer)  # binned: unused in the first pass (rows render as "" until fitted)
    # A pool costs seconds to start (each worker imports transformers): not worth it for small inputs.
    workers = args.workers if sum(f.stat().st_size for f in files) >= SMALL_INPUT_BYTES else 1
    fixed_names = None if args.classes == "raw" else list(schema.label_names(args.classes))
    # A text CSV's text is its serialization: no template renders it, and the manifest says so.
    template = TEXT_TEMPLATE if fmt == schema.FORMAT_TEXT else args.template
    spec = InputSpec(format=fmt, features=schema.FEATURES_BY_FORMAT[fmt], template=template,
                     classes=args.classes, label_column=layouts[0].label_column, unknown_labels=args.unknown_labels)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        rows_path = work / "rows.arrow"
        label_ids, labels, hashes, dropped, rows_by_file = _encode_rows(layouts, spec, tok, args.chunk_rows,
                                                                        workers, fixed_names, rows_path)
        t_encode = time.perf_counter() - t0
        if len(labels) == 0:
            raise DataError(f"no usable rows in {len(files)} input file(s): dropped {dict(dropped)}")
        # Final label names: fixed taxonomy order, or sorted raw labels.
        names = fixed_names or sorted(label_ids)
        label_map = np.array([names.index(n) for n in sorted(label_ids, key=label_ids.get)], dtype=np.int32)
        labels = label_map.astype(labels.dtype)[labels]  # int16 kept: 2 bytes per row
        split_code, dup_stats = splits.split_rows(labels, hashes, names, ratios, args.seed, args.max_per_class,
                                               args.small_classes, args.dedup, args.split)
        splits.cut_train(split_code, labels, args.max_train_rows, args.seed)
        small_dropped = {names[c]: int(n) for c, n in enumerate(
            np.bincount(labels[split_code == splits.TOO_SMALL], minlength=len(names))) if n}
        for code, reason in splits.DROP_REASONS.items():
            dropped[reason] += int((split_code == code).sum())
        dropped = Counter({k: v for k, v in dropped.items() if v})
        data_dir = work / "data"
        data_dir.mkdir()
        train_hashes = splits.train_hashes(hashes, split_code)
        np.save(data_dir / TRAIN_HASHES, train_hashes)
        hash_name = TEXT_HASH if fmt == schema.FORMAT_TEXT else FEATURE_HASH
        dedup = splits.dedup_report(args.dedup, hash_name, dup_stats, hashes, labels, split_code, names, ratios,
                                    train_hashes)
        del hashes, train_hashes
        bins, rerender = None, None
        if spec.template == binning.TEMPLATE:  # the edges come from the training split, known only now
            sample, n_train = binning.sample_train_features(rows_path, split_code, args.seed)
            bins = binning.fit(sample, list(spec.features), args.bins or binning.DEFAULT_BINS, sampled_from=n_train)
            tok = binning.build_tokenizer(bins)
            rerender = _binned_rerender(bins, list(spec.features), tok)
        hist = _write_splits(rows_path, work, data_dir, split_code, label_map, args.num_shards, rerender)
        rows_path.unlink()
        manifest = _build_manifest(args, spec, layouts, rows_by_file, names, ratios, labels, split_code, hist,
                                   dropped, tok)
        manifest["dedup"] = dedup
        if bins is not None:
            manifest["binning"] = bins
        manifest["small_classes_dropped"] = small_dropped
        (data_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(data_dir, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    _print_summary(manifest, out, elapsed, t_encode)
    return 0


def _encode_rows(layouts, spec: InputSpec, tokenizer, chunk_rows: int, workers: int, fixed_names: list[str] | None,
                 rows_path: Path) -> tuple[dict[str, int], np.ndarray, np.ndarray, Counter, Counter]:
    """Encode every input row into the temporary Arrow stream `rows_path`, keeping only a compact label array
    and the 64-bit feature-vector hash of each row.

    Returns (label name -> provisional id (taxonomy order, or raw labels by first appearance), provisional
    label id of each kept row, hash of each kept row, rows dropped per reason, rows read per file).
    """
    from cic_gpt2.progress import bar as tqdm  # plain lines, not \r redraws, into a log

    label_ids: dict[str, int] = {n: i for i, n in enumerate(fixed_names or [])}
    labels_parts: list[np.ndarray] = []
    hash_parts: list[np.ndarray] = []
    dropped: Counter = Counter()
    rows_by_file: Counter = Counter()
    with tqdm(unit=" rows", unit_scale=True, desc="prepare", dynamic_ncols=True, file=sys.stderr) as bar, \
            pa.ipc.new_stream(str(rows_path), ROW_SCHEMA) as writer:
        for chunk in stream_chunks(layouts, spec, chunk_rows, workers, tokenizer, False):
            if chunk.unknown and spec.unknown_labels == "error":
                raise unknown_label_error(chunk, spec)
            for name in chunk.label_uniques:  # raw labels: ids by first appearance (remapped later)
                label_ids.setdefault(name, len(label_ids))
            ids = np.array([label_ids[u] for u in chunk.label_uniques] + [-1], np.int32)[chunk.label_codes]
            writer.write_batch(_chunk_batch(chunk, ids))
            labels_parts.append(ids.astype(np.int16 if len(label_ids) < 2**15 else np.int32))
            hash_parts.append(chunk.hashes)
            dropped.update(chunk.dropped_reasons)
            rows_by_file[chunk.path] += chunk.rows_read
            bar.update(chunk.rows_read)
    labels = np.concatenate(labels_parts) if labels_parts else np.zeros(0, np.int16)
    hashes = np.concatenate(hash_parts) if hash_parts else np.zeros(0, np.uint64)
    return label_ids, labels, hashes, dropped, rows_by_file


def _build_manifest(args: argparse.Namespace, spec: InputSpec, layouts, rows_by_file: Counter, names: list[str],
                    ratios, labels: np.ndarray, split_code: np.ndarray, hist: np.ndarray, dropped: Counter,
                    tokenizer) -> dict:
    from cic_gpt2.tokenizer import tokenizer_fingerprint, tokenizer_source

    n_tokens = int((hist * np.arange(len(hist))).sum())
    n_rows = int(hist.sum())
    return {
        "version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": [{"path": str(layout.path.resolve()), "size": layout.path.stat().st_size,
                    "sha256": _file_sha256(layout.path), "rows": int(rows_by_file[str(layout.path)]),
                    "ignored_columns": layout.ignored} for layout in layouts],
        "format": spec.format,
        "label_column": spec.label_column,
        "features": list(spec.features),
        "template": spec.template,
        "classes": args.classes,
        "label_names": list(names),
        "label2id": {n: i for i, n in enumerate(names)},
        "split": {"ratios": list(ratios), "seed": args.seed},
        "splits": {s: {"rows": int((split_code == i).sum()),
                       "class_counts": {names[c]: int(n) for c, n in enumerate(
                           np.bincount(labels[split_code == i], minlength=len(names)))}}
                   for i, s in enumerate(SPLITS)},
        "token_stats": {"mean": round(n_tokens / max(1, n_rows), 3), "p50": _percentile_from_hist(hist, 50),
                        "p95": _percentile_from_hist(hist, 95), "max": len(hist) - 1},
        "max_length": len(hist) - 1,
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
                      "eos_token_id": tokenizer.eos_token_id, "source": tokenizer_source(tokenizer)},
        "dropped": dict(sorted(dropped.items())),
        "max_per_class": args.max_per_class,
        "max_train_rows": args.max_train_rows,
        "rows_read": int(sum(rows_by_file.values())),
    }


def _print_summary(m: dict, out: Path, elapsed: float, t_encode: float) -> None:
    rows = m["rows_read"]
    print(f"prepared {rows:,} rows from {len(m['inputs'])} file(s) [{m['format']}] in {elapsed:.1f} s "
          f"({rows / max(elapsed, 1e-9):,.0f} rows/s; read+encode {rows / max(t_encode, 1e-9):,.0f} rows/s)")
    print(f"template {m['template']}: tokens/row mean {m['token_stats']['mean']}, p50 {m['token_stats']['p50']}, "
          f"p95 {m['token_stats']['p95']}, max {m['token_stats']['max']}")
    print(f"classes {m['classes']} ({len(m['label_names'])}): "
          + ", ".join(f"{s} {m['splits'][s]['rows']:,}" for s in SPLITS))
    if m["small_classes_dropped"]:
        need = splits.min_rows_per_class(m["split"]["ratios"])
        listed = ", ".join(f"{k} ({v:,} row{'s' if v != 1 else ''})" for k, v in m["small_classes_dropped"].items())
        print(f"warning: dropped {len(m['small_classes_dropped'])} class(es) with fewer than {need} rows (one per "
              f"split): {listed}; the model will not know them (more data or a coarser --classes keeps them; "
              f"--small-classes error stops instead)")
    dropped = m["dropped"]
    print("dropped: " + (", ".join(f"{k} {v:,}" for k, v in dropped.items()) if dropped else "none"))
    for line in splits.report_lines(m["dedup"]):
        print(line)
    print(f"output: {out}  (manifest.json, {', '.join(SPLITS)})")
