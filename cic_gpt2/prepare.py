"""`cic-gpt2 prepare INPUT... --output DIR`: CICIoT2023 CSVs -> text -> GPT-2 token ids -> sharded Arrow splits.

    cic-gpt2 prepare data/part-*.csv --output prepared/ --classes 8 --template compact
    cic-gpt2 prepare Merged01.csv Merged02.csv --output prepared/ --max-per-class 200000 --overwrite

Pipeline (memory stays bounded whatever the input size):
  1. stream each CSV in chunks (pandas), check cells, map labels, serialize (templates.py) and tokenize
     (tokenizer.WordEncoder) in worker processes; append kept rows to a temporary Arrow IPC stream and keep
     only a compact label array in memory;
  2. choose the stratified split (and the per-class cap) from that label array;
  3. stream the temporary file once more, routing rows into per-split shard files, then save each shard with
     datasets' save_to_disk; write manifest.json; rename the temp dir onto DIR.
Every data row is either written or dropped with a reason: manifest["dropped"], printed at the end.
"""
from __future__ import annotations

import argparse
import datetime as dt
import glob
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from cic_gpt2 import __version__
from cic_gpt2 import schema
from cic_gpt2.errors import DataError
from cic_gpt2.files import replace_dir
from cic_gpt2.templates import TEMPLATES, render

HELP = "CICIoT2023 CSVs -> serialized, tokenized, sharded Arrow splits + manifest.json"
SPLITS = ("train", "val", "test")
DEFAULT_CHUNK_ROWS = 50_000
SHARD_BYTES = 256 << 20
SMALL_INPUT_BYTES = 16 << 20
# Drop reasons, in the order they are tested (a row gets the first that applies).
REASONS = ("repeated_header", "missing_label", "unknown_label", "missing_text", "non_numeric", "nan", "inf")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="CSV files, directories (their *.csv) or globs")
    p.add_argument("--output", "-o", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--classes", choices=schema.CLASSES_CHOICES, default="34",
                   help="label taxonomy: 34 classes, 8 official groups, 2 (Benign/Attack) or raw labels as written")
    p.add_argument("--template", choices=TEMPLATES, default="compact", help="row -> text serialization")
    p.add_argument("--label-column", default=None, help="label column name (default: the column named label, any case)")
    p.add_argument("--unknown-labels", choices=("error", "drop"), default="error",
                   help="labels outside the taxonomy: stop with an error listing them, or drop those rows")
    p.add_argument("--small-classes", choices=("error", "drop"), default="error",
                   help="classes with fewer than 3 rows (one per split): error, or drop their rows")
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions (default 0.8,0.1,0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split and the per-class cap")
    p.add_argument("--max-per-class", type=int, default=None, metavar="N",
                   help="keep at most N rows of each class (random, seeded) before splitting")
    p.add_argument("--tokenizer", default=None, help="tokenizer/model dir (default: the bundled GPT-2 BPE)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes serializing+tokenizing chunks (1 = in this process)")
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows per streamed CSV chunk")
    p.add_argument("--num-shards", type=int, default=None, help="Arrow shards per split (default: ~256 MiB each)")


# ================================================================================================ inputs
def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files from paths, directories (sorted *.csv inside, recursively) and globs; missing -> DataError."""
    files: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() == ".csv")
            if not found:
                raise DataError(f"{pattern}: directory has no *.csv files")
            files += found
        elif p.is_file():
            files.append(p)
        elif glob.has_magic(pattern):
            found = sorted(Path(q) for q in glob.glob(pattern, recursive=True) if Path(q).is_file())
            if not found:
                raise DataError(f"{pattern}: no file matches this pattern")
            files += found
        else:
            raise DataError(f"{pattern}: no such file or directory")
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{f}: file is empty (0 bytes); remove it from the inputs")
    return files


def read_header(path: Path) -> list[str]:
    try:
        cols = pd.read_csv(path, nrows=0, encoding="utf-8").columns
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file has no header line (empty or only blank lines)") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: not a readable UTF-8 CSV ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return [str(c).strip().lstrip("\ufeff") for c in cols]


@dataclass(frozen=True)
class InputSpec:
    """What every input file must provide, and how its rows become text + label."""
    format: str
    features: tuple[str, ...]
    template: str
    classes: str
    label_column: str | None  # None: unlabeled input (predict)
    label2id: dict[str, int] | None = None  # fixed mapping (from a manifest); None: prepare assigns ids
    unknown_labels: str = "error"


@dataclass
class _FileLayout:
    """How one file's header maps onto the spec: CSV column name of each feature / the label / the text."""
    path: Path
    feature_columns: list[str]
    label_column: str | None
    text_column: str | None
    ignored: list[str]


def resolve_layout(path: Path, label_column: str | None, require_label: bool) -> tuple[str, _FileLayout]:
    header = read_header(path)
    if label_column is not None and label_column not in header and not require_label:
        label_column = None  # unlabeled input (predict): fall back to auto-detection, which may find none
    try:
        fmt, label = schema.detect_format(header, label_column)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    if label is None and require_label:
        raise DataError(f"{path}: no label column (columns: {', '.join(header)}); name it with --label-column")
    if fmt == schema.FORMAT_TEXT:
        text = next(c for c in header if c.lower() == schema.TEXT_COLUMN)
        used, features = {text, label}, []
    else:
        canon = schema.canonical_columns([c for c in header if c != label])
        by_feature = {f: c for c, f in canon.items()}
        features = [by_feature[f] for f in schema.FEATURES_BY_FORMAT[fmt]]
        text, used = None, set(features) | {label}
    ignored = [c for c in header if c not in used]
    return fmt, _FileLayout(path, features, label, text, ignored)


# ================================================================================================ chunks
@dataclass
class EncodedChunk:
    """One streamed chunk of one input file, serialized and tokenized.

    Kept rows (n):   row_ids int64 (global, 0-based over all input files' data rows), input_ids
                     pa.ListArray<int32> (GPT-2 ids, no special tokens), labels int32 (class id, -1 when
                     unlabeled), label_codes int32 + label_uniques (class name of each row is
                     label_uniques[label_codes[i]]; code -1 when unlabeled), features float32
                     (n, n_features; (n, 0) for text input), texts (pa.StringArray, only with_text=True).
    Dropped rows:    dropped_row_ids int64 and dropped_reasons (list[str], one of REASONS) in row order.
    rows_read = n + len(dropped_row_ids); path = the source file.
    """
    path: str
    row_ids: np.ndarray
    input_ids: pa.ListArray
    labels: np.ndarray
    label_codes: np.ndarray
    label_uniques: list[str]
    features: np.ndarray
    dropped_row_ids: np.ndarray
    dropped_reasons: list[str]
    rows_read: int
    texts: pa.Array | None = None
    unknown: dict[str, int] = field(default_factory=dict)  # unknown raw label -> first row id

    @property
    def label_names(self) -> list[str | None]:
        """Class name of each kept row (None when unlabeled)."""
        return [self.label_uniques[c] if c >= 0 else None for c in self.label_codes.tolist()]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.input_ids.offsets.to_numpy()).astype(np.int32)


def _read_chunks(layout: _FileLayout, chunk_rows: int) -> Iterator[pd.DataFrame]:
    n = 0
    try:
        # index_col=False: a first data row with extra fields must not silently become an index.
        reader = pd.read_csv(layout.path, chunksize=chunk_rows, encoding="utf-8", skipinitialspace=True,
                             index_col=False, dtype={c: "str" for c in (layout.label_column, layout.text_column) if c})
        while True:
            with warnings.catch_warnings():  # around next() only: never left active across a yield
                warnings.simplefilter("error", pd.errors.ParserWarning)
                chunk = next(reader, None)
            if chunk is None:
                break
            chunk.columns = [str(c).strip().lstrip("\ufeff") for c in chunk.columns]
            n += len(chunk)
            yield chunk
    except (pd.errors.ParserError, pd.errors.ParserWarning) as e:
        raise DataError(f"{layout.path}: malformed CSV ({str(e).strip().splitlines()[-1]}) near data row {n}; "
                        f"fix or remove that line") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{layout.path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if n == 0:
        raise DataError(f"{layout.path}: header only, no data rows; remove it from the inputs")


def _check_chunk(df: pd.DataFrame, layout: _FileLayout, spec: InputSpec):
    """(reason code per row (0 = keep, i = REASONS[i-1]), float64 feature matrix, mapped label names, unknowns)."""
    n = len(df)
    reason = np.zeros(n, dtype=np.int8)

    def mark(mask: np.ndarray, name: str) -> None:
        reason[(reason == 0) & mask] = REASONS.index(name) + 1

    first_col = layout.label_column or layout.feature_columns[0]
    header_again = df[first_col].astype("str").str.strip().to_numpy(dtype=object) == first_col
    mark(header_again, "repeated_header")
    names: list | np.ndarray = [None] * n
    unknown: dict[str, int] = {}
    if layout.label_column is not None:
        raw = df[layout.label_column].astype("string")  # numeric labels too; NA stays NA
        missing = raw.isna().to_numpy() | (raw.fillna("").str.strip() == "").to_numpy()
        mark(missing, "missing_label")
        codes, uniques = pd.factorize(raw.fillna("").str.strip())
        mapped_uniques = np.array([schema.map_label(u, spec.classes) for u in uniques] + [None], dtype=object)
        names = mapped_uniques[codes]  # code -1 (NaN) -> None
        if spec.label2id is not None:
            names = np.array([m if m in spec.label2id else None for m in names], dtype=object)
        bad = (names == None) & (reason == 0)  # noqa: E711 (elementwise)
        for i in np.flatnonzero(bad):
            unknown.setdefault(str(raw.iloc[i]).strip(), int(i))
        mark(bad, "unknown_label")
    if layout.text_column is not None:
        texts = df[layout.text_column]
        mark(texts.isna().to_numpy(), "missing_text")
        return reason, np.zeros((n, 0)), names, unknown, texts.fillna("").astype("str")
    values = np.empty((n, len(layout.feature_columns)), dtype=np.float64)
    non_numeric = np.zeros(n, dtype=bool)
    for j, c in enumerate(layout.feature_columns):
        col = df[c]
        if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
            values[:, j] = col.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            num = _to_numeric(col)
            non_numeric |= (num.isna() & col.notna()).to_numpy()
            values[:, j] = num.to_numpy(dtype=np.float64, na_value=np.nan)
    mark(non_numeric, "non_numeric")
    mark(np.isnan(values).any(axis=1), "nan")
    # beyond float32 the stored `features` would be inf: drop such rows as inf too
    with np.errstate(invalid="ignore"):
        mark((np.isinf(values) | (np.abs(values) > np.finfo(np.float32).max)).any(axis=1), "inf")
    return reason, values, names, unknown, None


_NUMBER = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"


def _to_numeric(col: pd.Series) -> pd.Series:
    """pd.to_numeric(errors="coerce"), except that integer literals beyond float64 (which make pandas raise
    OverflowError) become +-inf, so the row is dropped as `inf` rather than crashing."""
    try:
        return pd.to_numeric(col, errors="coerce")
    except OverflowError:
        text = col.astype("string")
        ok = text.str.match(_NUMBER).fillna(False).astype(bool)
        out = pd.Series(np.nan, index=col.index, dtype=np.float64)
        out[ok] = [float(v) for v in text[ok]]
        return out


# Per-process state for worker pools (tokenizer + word cache live in each process).
_WORKER: dict = {}


def _init_worker(tokenizer) -> None:
    """tokenizer: a loaded tokenizer, or its Rust backend serialized as JSON (cheap to ship to workers, and
    a worker then never imports transformers)."""
    from cic_gpt2.tokenizer import WordEncoder

    if isinstance(tokenizer, str):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(tokenizer)
    _WORKER["encoder"] = WordEncoder(tokenizer)


def _encode_chunk(task) -> EncodedChunk:
    df, layout, spec, first_row_id, with_text = task
    reason, values, names, unknown, texts = _check_chunk(df, layout, spec)
    keep = reason == 0
    row_ids = first_row_id + np.arange(len(df), dtype=np.int64)
    if texts is None:
        texts = render(spec.template, values[keep], spec.features)
        features = values[keep].astype(np.float32)
    else:
        texts = pa.array(texts.to_numpy(dtype=object)[keep], type=pa.string())
        features = np.zeros((int(keep.sum()), 0), dtype=np.float32)
    flat, offsets = _WORKER["encoder"].encode(texts)
    input_ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat, type=pa.int32()))
    codes, uniques = pd.factorize(np.asarray(names, dtype=object)[keep])  # None -> -1
    codes = codes.astype(np.int32)
    uniques = [str(u) for u in uniques]
    labels = np.full(len(codes), -1, dtype=np.int32)
    if spec.label2id is not None and layout.label_column is not None and len(codes):
        labels = np.array([spec.label2id[u] for u in uniques] + [-1], dtype=np.int32)[codes]
    return EncodedChunk(
        path=str(layout.path), row_ids=row_ids[keep], input_ids=input_ids, labels=labels,
        label_codes=codes, label_uniques=uniques,
        features=features, dropped_row_ids=row_ids[~keep],
        dropped_reasons=[REASONS[r - 1] for r in reason[~keep]], rows_read=len(df),
        texts=texts if with_text else None,
        unknown={k: int(first_row_id + i) for k, i in unknown.items()})


def _unknown_error(chunk: EncodedChunk, spec: InputSpec) -> DataError:
    listed = ", ".join(repr(k) for k in list(chunk.unknown)[:12]) + (", ..." if len(chunk.unknown) > 12 else "")
    first = min(chunk.unknown.values())
    hint = ("use --classes raw to keep labels as written" if spec.classes != "raw" else "")
    return DataError(f"{chunk.path}: unknown labels for --classes {spec.classes} (first at row id {first}): "
                     f"{listed}; {hint + ', or ' if hint else ''}--unknown-labels drop to skip those rows")


def _stream(layouts, spec, chunk_rows, workers, tokenizer, with_text) -> Iterator[EncodedChunk]:
    """Encoded chunks in input order; `workers` > 1 encodes in a process pool with bounded look-ahead."""
    def tasks():
        row_id = 0
        for layout in layouts:
            for df in _read_chunks(layout, chunk_rows):
                yield (df, layout, spec, row_id, with_text)
                row_id += len(df)

    if workers <= 1:
        _init_worker(tokenizer)
        for task in tasks():
            yield _encode_chunk(task)
        return
    # forkserver: workers start from a clean process (no inherited tokenizer/Arrow threads), with this
    # module preloaded so each start costs a fork, not a re-import.
    ctx = mp.get_context("forkserver" if sys.platform != "win32" else "spawn")
    if sys.platform != "win32":
        ctx.set_forkserver_preload(["cic_gpt2.prepare"])
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer).to_str()
    with ctx.Pool(workers, initializer=_init_worker, initargs=(backend,)) as pool:
        pending: deque = deque()
        for task in tasks():
            pending.append(pool.apply_async(_encode_chunk, (task,)))
            if len(pending) >= 2 * workers:  # bounded: never more than 2 chunks per worker in flight
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def encode_csvs(paths, manifest: dict, tokenizer, require_label: bool = True,
                chunk_rows: int = DEFAULT_CHUNK_ROWS, unknown_labels: str = "error",
                with_text: bool = False) -> Iterator[EncodedChunk]:
    """Encode raw CSVs exactly as `prepare` did for `manifest` (same format, features, template, taxonomy).

    paths: files/dirs/globs. tokenizer: a loaded tokenizer (should match manifest["tokenizer"]["fingerprint"]).
    require_label=False accepts files without a label column (labels are then -1). Labels outside the
    manifest's label2id: DataError, or dropped with reason "unknown_label" when unknown_labels="drop".
    Yields EncodedChunk (see its docstring) in input order, in this process.
    """
    spec = InputSpec(format=manifest["format"], features=tuple(manifest["features"]),
                     template=manifest["template"], classes=manifest["classes"],
                     label_column=manifest.get("label_column"), label2id=dict(manifest["label2id"]),
                     unknown_labels=unknown_labels)
    _, layouts = _resolve_all(expand_inputs([str(p) for p in paths]), spec.label_column, require_label,
                              expect_format=spec.format)
    for chunk in _stream(layouts, spec, chunk_rows, 1, tokenizer, with_text):
        if chunk.unknown and unknown_labels == "error":
            raise _unknown_error(chunk, spec)
        yield chunk


def _resolve_all(files: list[Path], label_column: str | None, require_label: bool,
                 expect_format: str | None = None) -> tuple[str, list[_FileLayout]]:
    layouts, first_fmt = [], expect_format
    for f in files:
        fmt, layout = resolve_layout(f, label_column, require_label)
        if first_fmt is None:
            first_fmt = fmt
        elif fmt != first_fmt:
            raise DataError(f"{f}: format {fmt} differs from {first_fmt} of the other inputs; "
                            f"prepare each format separately")
        layouts.append(layout)
    return first_fmt, layouts


# ================================================================================================ split
def parse_split(text: str) -> tuple[float, float, float]:
    try:
        ratios = tuple(float(x) for x in text.split(","))
    except ValueError:
        ratios = ()
    if len(ratios) != 3 or min(ratios) < 0 or ratios[0] <= 0 or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise DataError(f"--split {text!r}: give three fractions train,val,test that sum to 1, e.g. 0.8,0.1,0.1")
    return ratios  # type: ignore[return-value]


def min_rows_per_class(ratios) -> int:
    return sum(1 for r in ratios if r > 0)


def assign_splits(labels: np.ndarray, num_classes: int, ratios, seed: int, max_per_class: int | None,
                  small_classes: set[int]) -> np.ndarray:
    """Split code per row: 0/1/2 = train/val/test, -1 = over --max-per-class, -2 = class too small (dropped).

    Stratified and deterministic: within each class a seeded permutation; the first rows (up to the cap) are
    divided by the ratios, at least one row in each split with a non-zero ratio.
    """
    rng = np.random.default_rng(seed)
    code = np.full(len(labels), -1, dtype=np.int8)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    for c in range(num_classes):
        idx = order[bounds[c]:bounds[c + 1]]
        if len(idx) == 0:
            continue
        if c in small_classes:
            code[idx] = -2
            continue
        idx = idx[rng.permutation(len(idx))]
        if max_per_class is not None:
            idx = idx[:max_per_class]
        n = len(idx)
        n_val = max(1, round(n * ratios[1])) if ratios[1] > 0 else 0
        n_test = max(1, round(n * ratios[2])) if ratios[2] > 0 else 0
        n_train = n - n_val - n_test
        code[idx[:n_train]] = 0
        code[idx[n_train:n_train + n_val]] = 1
        code[idx[n_train + n_val:]] = 2
    return code


# ================================================================================================ output
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _schema(n_features: int) -> pa.Schema:
    return pa.schema([("input_ids", pa.list_(pa.int32())), ("label", pa.int32()), ("length", pa.int32()),
                      ("row_id", pa.int64()), ("features", pa.list_(pa.float32()))])


def _chunk_batch(chunk: EncodedChunk, labels: np.ndarray) -> pa.RecordBatch:
    n, f = chunk.features.shape
    features = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * f),
                                        pa.array(chunk.features.reshape(-1), type=pa.float32()))
    return pa.record_batch([chunk.input_ids, pa.array(labels, pa.int32()), pa.array(chunk.lengths, pa.int32()),
                            pa.array(chunk.row_ids, pa.int64()), features], schema=_schema(f))


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


def _write_splits(rows_path: Path, work: Path, out: Path, split_code: np.ndarray, label_map: np.ndarray,
                  num_shards: int | None, n_features: int) -> np.ndarray:
    """Route the temporary rows into per-split shard files, save them; return the token-length histogram."""
    total_bytes = rows_path.stat().st_size
    bytes_per_row = total_bytes / max(1, len(split_code))
    rows_per_split = [int((split_code == s).sum()) for s in range(3)]
    shards = [max(1, min(r, num_shards or math.ceil(r * bytes_per_row / SHARD_BYTES))) for r in rows_per_split]
    per_shard = [math.ceil(r / k) if r else 0 for r, k in zip(rows_per_split, shards)]
    files: list[list[Path]] = [[] for _ in SPLITS]
    writers: list = [None, None, None]
    in_shard = [0, 0, 0]
    length_hist = np.zeros(1, dtype=np.int64)
    schema_ = _schema(n_features)

    def write(s: int, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            if writers[s] is None or in_shard[s] >= per_shard[s]:
                if writers[s] is not None:
                    writers[s].close()
                files[s].append(work / f"{SPLITS[s]}-{len(files[s]):05d}.arrow")
                writers[s], in_shard[s] = pa.ipc.new_stream(str(files[s][-1]), schema_), 0
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
            with pa.ipc.new_stream(str(files[s][-1]), schema_):
                pass
        _save_split(work, out / SPLITS[s], files[s])
    return length_hist


def _percentile_from_hist(hist: np.ndarray, q: float) -> int:
    cum = np.cumsum(hist)
    return int(np.searchsorted(cum, q / 100 * cum[-1])) if cum[-1] else 0


# ================================================================================================ main
def main(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from cic_gpt2.tokenizer import load_tokenizer, tokenizer_fingerprint, tokenizer_source

    t0 = time.perf_counter()
    ratios = parse_split(args.split)
    if args.max_per_class is not None and args.max_per_class < min_rows_per_class(ratios):
        raise DataError(f"--max-per-class {args.max_per_class}: must be >= {min_rows_per_class(ratios)} "
                        f"(one row per split)")
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it, or choose another --output")
    files = expand_inputs(args.inputs)
    fmt, layouts = _resolve_all(files, args.label_column, require_label=True)
    for layout in layouts:
        if layout.ignored:
            print(f"warning: {layout.path}: ignoring columns not used by the {fmt} format: "
                  f"{', '.join(layout.ignored)}", file=sys.stderr)
    tok = load_tokenizer(args.tokenizer)
    # A pool costs seconds to start (each worker imports transformers): not worth it for small inputs.
    workers = args.workers if sum(f.stat().st_size for f in files) >= SMALL_INPUT_BYTES else 1
    features = schema.FEATURES_BY_FORMAT[fmt]
    fixed_names = None if args.classes == "raw" else list(schema.label_names(args.classes))
    spec = InputSpec(format=fmt, features=features, template=args.template, classes=args.classes,
                     label_column=layouts[0].label_column, unknown_labels=args.unknown_labels)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        label_ids: dict[str, int] = {n: i for i, n in enumerate(fixed_names or [])}
        labels_parts: list[np.ndarray] = []
        dropped: Counter = Counter()
        rows_by_file: Counter = Counter()
        rows_path = work / "rows.arrow"
        with tqdm(unit=" rows", unit_scale=True, desc="prepare", dynamic_ncols=True, file=sys.stderr) as bar, \
                pa.ipc.new_stream(str(rows_path), _schema(len(features))) as writer:
            for chunk in _stream(layouts, spec, args.chunk_rows, workers, tok, False):
                if chunk.unknown and args.unknown_labels == "error":
                    raise _unknown_error(chunk, spec)
                for name in chunk.label_uniques:  # raw labels: ids by first appearance (remapped later)
                    label_ids.setdefault(name, len(label_ids))
                ids = np.array([label_ids[u] for u in chunk.label_uniques] + [-1], np.int32)[chunk.label_codes]
                writer.write_batch(_chunk_batch(chunk, ids))
                labels_parts.append(ids.astype(np.int16 if len(label_ids) < 2**15 else np.int32))
                dropped.update(chunk.dropped_reasons)
                rows_by_file[chunk.path] += chunk.rows_read
                bar.update(chunk.rows_read)
        t_encode = time.perf_counter() - t0
        labels = np.concatenate(labels_parts) if labels_parts else np.zeros(0, np.int16)
        if len(labels) == 0:
            raise DataError(f"no usable rows in {len(files)} input file(s): dropped {dict(dropped)}")

        # Final label names: fixed taxonomy order, or sorted raw labels.
        names = fixed_names or sorted(label_ids)
        label_map = np.array([names.index(n) for n in sorted(label_ids, key=label_ids.get)], dtype=np.int32)
        labels = label_map[labels]
        counts = np.bincount(labels, minlength=len(names))
        need = min_rows_per_class(ratios)
        small = {c for c in range(len(names)) if 0 < counts[c] < need}
        if small and args.small_classes == "error":
            listed = ", ".join(f"{names[c]} ({counts[c]} rows)" for c in sorted(small))
            raise DataError(f"classes too small for a {args.split} split (need >= {need} rows each): {listed}; "
                            f"use --small-classes drop, a coarser --classes, or more data")
        split_code = assign_splits(labels, len(names), ratios, args.seed, args.max_per_class, small)
        dropped["over_max_per_class"] += int((split_code == -1).sum())
        dropped["class_too_small"] += int((split_code == -2).sum())
        dropped = Counter({k: v for k, v in dropped.items() if v})
        data_dir = work / "data"
        data_dir.mkdir()
        hist = _write_splits(rows_path, work, data_dir, split_code, label_map, args.num_shards, len(features))
        rows_path.unlink()

        n_tokens = int((hist * np.arange(len(hist))).sum())
        n_rows = int(hist.sum())
        manifest = {
            "version": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "inputs": [{"path": str(layout.path.resolve()), "size": layout.path.stat().st_size,
                        "sha256": _file_sha256(layout.path), "rows": int(rows_by_file[str(layout.path)]),
                        "ignored_columns": layout.ignored} for layout in layouts],
            "format": fmt,
            "label_column": spec.label_column,
            "features": list(features),
            "template": args.template,
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
            "tokenizer": {"fingerprint": tokenizer_fingerprint(tok), "vocab_size": len(tok),
                          "eos_token_id": tok.eos_token_id, "source": tokenizer_source(tok)},
            "dropped": dict(sorted(dropped.items())),
            "max_per_class": args.max_per_class,
            "rows_read": int(sum(rows_by_file.values())),
        }
        (data_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(data_dir, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    _print_summary(manifest, out, elapsed, t_encode)
    return 0


def _print_summary(m: dict, out: Path, elapsed: float, t_encode: float) -> None:
    rows = m["rows_read"]
    print(f"prepared {rows:,} rows from {len(m['inputs'])} file(s) [{m['format']}] in {elapsed:.1f} s "
          f"({rows / max(elapsed, 1e-9):,.0f} rows/s; read+encode {rows / max(t_encode, 1e-9):,.0f} rows/s)")
    print(f"template {m['template']}: tokens/row mean {m['token_stats']['mean']}, p50 {m['token_stats']['p50']}, "
          f"p95 {m['token_stats']['p95']}, max {m['token_stats']['max']}")
    print(f"classes {m['classes']} ({len(m['label_names'])}): "
          + ", ".join(f"{s} {m['splits'][s]['rows']:,}" for s in SPLITS))
    dropped = m["dropped"]
    print("dropped: " + (", ".join(f"{k} {v:,}" for k, v in dropped.items()) if dropped else "none"))
    print(f"output: {out}  (manifest.json, {', '.join(SPLITS)})")
