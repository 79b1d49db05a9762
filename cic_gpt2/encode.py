"""The one CSV encode path: read, check, serialize and tokenize CICIoT2023 rows (prepare, evaluate, predict).

Input formats, cell checks, drop reasons and how the streaming scales: docs/prepare.md.
"""
from __future__ import annotations

import glob
import multiprocessing as mp
import sys
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from cic_gpt2 import schema
from cic_gpt2.csvfields import Counts
from cic_gpt2.errors import DataError
from cic_gpt2.templates import render

DEFAULT_CHUNK_ROWS = 50_000
# Drop reasons, in the order they are tested (a row gets the first that applies). `truncated`: the file's
# last row, cut short (fewer fields than the header, no final newline); `wrong_field_count`: any other row
# with fewer or more fields than the header (its cells cannot be trusted to be in their columns).
REASONS = ("truncated", "wrong_field_count", "repeated_header", "missing_label", "unknown_label", "missing_text",
           "non_numeric", "nan", "inf")


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
    label_required: bool = True  # False (predict): an empty or unknown label leaves the row unlabeled, kept
    binning: dict | None = field(default=None, hash=False, compare=False)  # template binned: the bin edges


@dataclass
class FileLayout:
    """How one file's header maps onto the spec: CSV column name of each feature / the label / the text."""
    path: Path
    feature_columns: list[str]
    label_column: str | None
    text_column: str | None
    ignored: list[str]
    n_columns: int = 0  # fields in the header line


def resolve_layout(path: Path, label_column: str | None, require_label: bool) -> tuple[str, FileLayout]:
    """(format, layout) of one file from its header; DataError naming the file when no format fits, or when
    require_label and it has no label column."""
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
    return fmt, FileLayout(path, features, label, text, ignored, len(header))


def resolve_layouts(files: list[Path], label_column: str | None, require_label: bool,
                    expect_format: str | None = None) -> tuple[str, list[FileLayout]]:
    """Layout of each file; all must share one format (`expect_format`, or the first file's)."""
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


def check_format(path: Path, manifest: dict, require_label: bool) -> bool:
    """The input's CSV format must be the model's training format; returns whether it has a label column."""
    fmt, layout = resolve_layout(path, manifest.get("label_column"), require_label=require_label)
    if fmt != manifest["format"]:
        raise DataError(f"{path}: a {fmt} CSV, but the model was trained on {manifest['format']} rows "
                        f"({len(manifest['features'])} features); score it with a model trained on {fmt} data")
    return layout.label_column is not None


# ================================================================================================ chunks
@dataclass
class EncodedChunk:
    """One streamed chunk of one input file, serialized and tokenized.

    Kept rows (n):   row_ids int64 (global, 0-based over all input files' data rows), input_ids
                     pa.ListArray<int32> (GPT-2 ids, no special tokens), labels int32 (class id, -1 when
                     unlabeled), label_codes int32 + label_uniques (class name of each row is
                     label_uniques[label_codes[i]]; code -1 when unlabeled), features float32
                     (n, n_features; (n, 0) for text input), hashes uint64 (`feature_hashes` of the
                     features; `text_hashes` of the text for text input), texts (pa.StringArray, only
                     with_text=True).
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
    hashes: np.ndarray
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


def _read_chunks(layout: FileLayout, chunk_rows: int) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """(chunk, field count of each of its rows: `csvfields.Counts`, negated for a last row without
    a final newline)."""
    n = 0
    counts = Counts(layout.path)
    try:
        # index_col=False: a first data row with extra fields must not silently become an index. usecols:
        # a row with extra fields is read (its extra cells left out) and dropped below by its field count.
        reader = pd.read_csv(layout.path, chunksize=chunk_rows, encoding="utf-8", skipinitialspace=True,
                             index_col=False, usecols=range(layout.n_columns),
                             dtype={c: "str" for c in (layout.label_column, layout.text_column) if c})
        while True:
            with warnings.catch_warnings():  # around next() only: never left active across a yield
                warnings.simplefilter("error", pd.errors.ParserWarning)
                chunk = next(reader, None)
            if chunk is None:
                break
            chunk.columns = [str(c).strip().lstrip("\ufeff") for c in chunk.columns]
            n += len(chunk)
            fields = counts.take(len(chunk))
            # Should the two readers ever disagree on where rows end, rows past the count are not flagged.
            fields = np.pad(fields, (0, len(chunk) - len(fields)), constant_values=len(chunk.columns))
            yield chunk, fields
    except (pd.errors.ParserError, pd.errors.ParserWarning) as e:
        raise DataError(f"{layout.path}: malformed CSV ({str(e).strip().splitlines()[-1]}) near data row {n}; "
                        f"fix or remove that line") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{layout.path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if n == 0:
        raise DataError(f"{layout.path}: header only, no data rows; remove it from the inputs")


def _check_chunk(df: pd.DataFrame, layout: FileLayout, spec: InputSpec, fields: np.ndarray | None = None):
    """(reason code per row (0 = keep, i = REASONS[i-1]), float64 feature matrix, mapped label names, unknowns).
    fields: each row's field count from `_read_chunks` (None: not checked)."""
    n = len(df)
    reason = np.zeros(n, dtype=np.int8)

    def mark(mask: np.ndarray, name: str) -> None:
        reason[(reason == 0) & mask] = REASONS.index(name) + 1

    if fields is not None:
        mark((fields < 0) & (-fields < len(df.columns)), "truncated")
        mark(np.abs(fields) != len(df.columns), "wrong_field_count")
    first_col = layout.label_column or layout.feature_columns[0]
    header_again = df[first_col].astype("str").str.strip().to_numpy(dtype=object) == first_col
    mark(header_again, "repeated_header")
    names: list | np.ndarray = [None] * n
    unknown: dict[str, int] = {}
    if layout.label_column is not None:
        raw = df[layout.label_column].astype("string")  # numeric labels too; NA stays NA
        missing = raw.isna().to_numpy() | (raw.fillna("").str.strip() == "").to_numpy()
        if spec.label_required:
            mark(missing, "missing_label")
        codes, uniques = pd.factorize(raw.fillna("").str.strip())
        mapped_uniques = np.array([schema.map_label(u, spec.classes) for u in uniques] + [None], dtype=object)
        names = mapped_uniques[codes]  # code -1 (NaN) -> None
        if spec.label2id is not None:
            names = np.array([m if m in spec.label2id else None for m in names], dtype=object)
        bad = (names == None) & (reason == 0) & ~missing  # noqa: E711 (elementwise)
        if spec.label_required:
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


# Names of the row-identity hashes, stored in the manifest (`dedup.hash`): a change of either function must
# change its name, so that hashes of different functions are never compared.
FEATURE_HASH, TEXT_HASH = "feature_hashes/float32-splitmix64-v1", "text_hashes/utf8-blake2b64-v1"
# splitmix64's finalizer (Steele, Lea & Flood 2014): a bijective 64-bit mixer.
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(h: np.ndarray, tmp: np.ndarray) -> None:
    """splitmix64 finalizer of every element, in place (uint64 arithmetic wraps modulo 2**64)."""
    for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
        np.right_shift(h, np.uint64(shift), out=tmp)
        h ^= tmp
        if mult is not None:
            h *= mult


def feature_hashes(features: np.ndarray) -> np.ndarray:
    """64-bit hash of each row's feature vector as stored in `features` (float32; -0.0 counts as 0.0).

    Equal vectors give equal hashes on every machine, chunking and run; distinct vectors collide with
    probability ~2**-64 per pair. The float32 bit patterns, packed two per little-endian 64-bit word (a zero
    pad for an odd count), are folded with the splitmix64 finalizer: h = mix(h ^ word), starting from
    mix(golden * words). Vectorised over rows: ~2.7M rows/s on one core for the 39 v2 features. Rows with
    NaN never reach `features`, so NaN payloads need no normalising.
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (rows, features), got shape {x.shape}")
    bits = np.ascontiguousarray(x + np.float32(0.0), dtype="<f4")  # + 0.0 turns -0.0 into 0.0
    if bits.shape[1] % 2:
        bits = np.concatenate([bits, np.zeros((len(bits), 1), "<f4")], axis=1)
    words = np.ascontiguousarray(bits.view("<u8").T, dtype=np.uint64)  # [words, rows]: contiguous columns
    h = np.full(len(x), (_GOLDEN * len(words)) % 2**64, dtype=np.uint64)
    tmp = np.empty_like(h)
    _mix64(h, tmp)
    for word in words:
        h ^= word
        _mix64(h, tmp)
    return h


def text_hashes(texts) -> np.ndarray:
    """64-bit hash of each text (UTF-8 bytes, BLAKE2b-64): the row identity of `text`-format input."""
    import hashlib

    values = texts.to_pylist() if isinstance(texts, pa.Array) else list(texts)
    return np.array([int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little")
                     for t in values], dtype=np.uint64)


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
    df, fields, layout, spec, first_row_id, with_text = task
    reason, values, names, unknown, texts = _check_chunk(df, layout, spec, fields)
    keep = reason == 0
    row_ids = first_row_id + np.arange(len(df), dtype=np.int64)
    if texts is None:
        texts = render(spec.template, values[keep], spec.features, spec.binning)
        features = values[keep].astype(np.float32)
        hashes = feature_hashes(features)
    else:
        texts = pa.array(texts.to_numpy(dtype=object)[keep], type=pa.string())
        features = np.zeros((int(keep.sum()), 0), dtype=np.float32)
        hashes = text_hashes(texts)
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
        features=features, hashes=hashes, dropped_row_ids=row_ids[~keep],
        dropped_reasons=[REASONS[r - 1] for r in reason[~keep]], rows_read=len(df),
        texts=texts if with_text else None,
        unknown={k: int(first_row_id + i) for k, i in unknown.items()})


def unknown_label_error(chunk: EncodedChunk, spec: InputSpec) -> DataError:
    """The one-line error for `--unknown-labels error`: the chunk's file, first row id and unknown labels."""
    listed = ", ".join(repr(k) for k in list(chunk.unknown)[:12]) + (", ..." if len(chunk.unknown) > 12 else "")
    first = min(chunk.unknown.values())
    hint = ("use --classes raw to keep labels as written" if spec.classes != "raw" else "")
    return DataError(f"{chunk.path}: unknown labels for --classes {spec.classes} (first at row id {first}): "
                     f"{listed}; {hint + ', or ' if hint else ''}--unknown-labels drop to skip those rows")


def stream_chunks(layouts, spec, chunk_rows, workers, tokenizer, with_text) -> Iterator[EncodedChunk]:
    """Encoded chunks in input order; `workers` > 1 encodes in a process pool with bounded look-ahead."""
    def tasks():
        row_id = 0
        for layout in layouts:
            for df, fields in _read_chunks(layout, chunk_rows):
                yield (df, fields, layout, spec, row_id, with_text)
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
        ctx.set_forkserver_preload(["cic_gpt2.encode"])
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
    require_label=False (predict) accepts files without a label column, and keeps rows whose label is empty
    or outside the manifest's label2id (their label is then -1). With require_label, labels outside
    label2id: DataError, or dropped with reason "unknown_label" when unknown_labels="drop"; empty labels
    are dropped as "missing_label".
    Yields EncodedChunk (see its docstring) in input order, in this process.
    """
    spec = InputSpec(format=manifest["format"], features=tuple(manifest["features"]),
                     template=manifest["template"], classes=manifest["classes"],
                     label_column=manifest.get("label_column"), label2id=dict(manifest["label2id"]),
                     unknown_labels=unknown_labels, label_required=require_label, binning=manifest.get("binning"))
    _, layouts = resolve_layouts(expand_inputs([str(p) for p in paths]), spec.label_column, require_label,
                                 expect_format=spec.format)
    for chunk in stream_chunks(layouts, spec, chunk_rows, 1, tokenizer, with_text):
        if chunk.unknown and unknown_labels == "error":
            raise unknown_label_error(chunk, spec)
        yield chunk
