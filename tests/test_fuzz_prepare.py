"""`prepare` (the CLI and `encode_csvs`) under a property-based fuzzer that corrupts REAL rows of the bundled
CICIoT2023 samples: truncated lines, missing and extra fields, text in numeric cells, NaN/inf spellings,
huge values (1e308, 1e400, 400 digits), non-UTF-8 bytes, blank and comma-only lines, repeated headers,
broken labels, mixed line endings, a missing final newline, chunk boundaries.

Properties, for every generated file:
  * never a traceback: `cic-gpt2 prepare` exits 0, or exits 2 with exactly one `error:` line whose cause
    the corruption explains (bad bytes, nothing usable); after an error nothing is left
    behind (no output dir, no temp dir). `encode_csvs` (the evaluate/predict path) yields or raises
    `CicError`, nothing else.
  * every data row is accounted for: the rows of the three splits + the dropped counts == the data rows
    of the input, counted here independently of pandas (non-blank lines after the header); row ids unique.
  * a row that had to be dropped (a NaN, an inf, text in a number, a broken label, a repeated header, more
    fields than the header) is
    never written, and `encode_csvs` names a reason that matches the corruption; untouched real rows are
    written (unless their class is too small) with their exact float32 values and mapped label.
  * no written feature is NaN/inf (values beyond float32 are dropped as inf).

Unbalanced double quotes are not generated: CSV quoting legitimately merges lines, so "a row" would no
longer be a line and the row count below would not be an independent oracle.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cic_gpt2 import encode, prepare, schema
from cic_gpt2.errors import CicError
from conftest import SAMPLE_V1, SAMPLE_V2, run_cli

# --------------------------------------------------------------------------------------------------
# The real rows
# --------------------------------------------------------------------------------------------------
SOURCES = {}
for _name, _path, _fmt in (("v2", SAMPLE_V2, "v2"), ("v1", SAMPLE_V1, "v1")):
    _lines = [ln.rstrip(b"\r") for ln in _path.read_bytes().split(b"\n")]
    _header, _rows = _lines[0], [ln for ln in _lines[1:] if ln.strip()]
    _cols = [c.decode() for c in _header.split(b",")]
    _label = schema.LABEL_COLUMN_BY_FORMAT[_fmt]
    SOURCES[_name] = dict(
        header=_header, rows=_rows, format=_fmt, columns=_cols, label_index=_cols.index(_label),
        feature_index=[_cols.index(f) if f in _cols else [schema.normalize_key(c) for c in _cols].index(
            schema.normalize_key(f)) for f in schema.FEATURES_BY_FORMAT[_fmt]],
    )

NAN_SPELLINGS = [b"nan", b"NaN", b"NA", b"null", b"", b"-nan", b"N/A"]
INF_SPELLINGS = [b"inf", b"-inf", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1" + b"0" * 400 + b".5"]
LONG_INTEGERS = [b"9" * 400, b"-" + b"1" * 330]  # integer literals beyond float64: should be dropped as inf
# While pandas' OverflowError escapes prepare (test_integer_literals_beyond_float64_are_dropped_not_a_traceback),
# the fuzzer does not draw them: one would fail every example it lands in. Set to False once fixed.
PENDING_LONG_INTEGER_FIX = False
HUGE_FINITE = [b"1e308", b"-1.7976931348623157e308", b"3.5e38"]  # finite in float64, beyond float32
LARGE_FINITE = [b"1e17", b"5e18", b"-2e19", b"1e30"]  # within float32, beyond int64 once scaled by 100
INT64_OVERFLOW = "9223372036854775808"  # what a float -> int64 cast that overflowed prints
NOT_UTF8 = [b"\xff", b"\xfe\xff", b"\xe9", b"\x80", b"\xc3\x28"]
TEXT_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -_./:"
ANY = "any"  # fate: written or dropped, either is fine (e.g. a truncation that cut a label to another label)


@dataclass
class Row:
    """One line of the generated file and what must happen to it."""

    data: bytes
    source: int | None = None  # index into SOURCES[...]["rows"] when the line started as a real row
    reasons: set = field(default_factory=set)  # must be dropped with one of these; empty = must be written
    label_reasons: set = field(default_factory=set)  # must be dropped for a taxonomy (not --classes raw)
    any_fate: bool = False
    beyond_float32: bool = False  # pending fix, see test_values_beyond_float32_are_dropped_not_written_as_inf
    large: bool = False  # pending fix, see test_large_fraction_values_are_not_rendered_as_int64_garbage
    touched: bool = False

    def cells(self) -> list[bytes]:
        return self.data.split(b",")


@dataclass
class Case:
    source: str
    lines: list[Row]  # data lines after the header, in file order (blank lines included; they are no rows)
    newline: bytes
    trailing_newline: bool
    classes: str
    chunk_rows: int

    def to_bytes(self) -> bytes:
        src = SOURCES[self.source]
        body = self.newline.join([src["header"]] + [r.data for r in self.lines])
        return body + (self.newline if self.trailing_newline else b"")

    def file_errors(self) -> set[str]:
        """Why the file as a whole must be refused, from the final bytes: "utf8" (a line that does not decode).
        A line with more fields than the header is no reason: that row is dropped (`wrong_field_count`)."""
        errors = set()
        for r in self.data_rows():
            try:
                r.data.decode("utf-8")
            except UnicodeDecodeError:
                errors.add("utf8")
        return errors

    def data_rows(self) -> list[Row]:
        """Rows in row-id order: every line that is not blank (pandas skips empty/whitespace-only lines)."""
        return [r for r in self.lines if r.data.strip()]


@st.composite
def cases(draw) -> Case:
    name = draw(st.sampled_from(sorted(SOURCES)))
    src = SOURCES[name]
    picks = draw(st.lists(st.integers(0, len(src["rows"]) - 1), min_size=6, max_size=50))
    lines = [Row(src["rows"][i], source=i) for i in picks]
    n_ops = draw(st.integers(0, 6))
    for _ in range(n_ops):
        op = draw(st.sampled_from(["truncate", "drop_field", "extra_field", "text_cell", "nan_cell", "inf_cell",
                                   "huge_cell", "large_cell", "label", "not_utf8", "blank_line", "commas_line", "header"]))
        i = draw(st.integers(0, len(lines) - 1))
        row = lines[i]
        if row.source is None and op not in ("blank_line", "commas_line", "header"):
            continue  # corrupt real rows only; inserted lines stay what they are
        cells = row.cells()
        j = draw(st.sampled_from(src["feature_index"]))
        if op not in ("truncate", "drop_field", "extra_field", "not_utf8") and len(cells) != len(src["columns"]):
            continue  # a cell edit needs the row's cells where the header says they are
        if op == "truncate":
            if len(row.data) < 2:
                continue
            k = draw(st.integers(1, len(row.data) - 1))
            row.data, row.any_fate = row.data[:k], True
        elif op == "drop_field":
            del cells[draw(st.integers(0, len(cells) - 1))]
            row.data = b",".join(cells)
            # the label moves into the wrong column (v2: the last column is left empty -> missing label);
            # v1 has an ignored column after the label whose value may well be a valid label
            row.reasons |= set(encode.REASONS)
            row.any_fate |= name == "v1"
        elif op == "extra_field":
            row.data += b"," + draw(st.sampled_from([b"1.0", b"", b"x"]))
            row.reasons |= {"wrong_field_count"}
        elif op in ("text_cell", "nan_cell", "inf_cell", "huge_cell", "large_cell"):
            if op == "text_cell":
                text = draw(st.text(TEXT_ALPHABET, min_size=1, max_size=12).filter(
                    lambda t: t.strip() and t.strip()[0].isalpha()))
                cells[j] = text.encode()
                row.reasons |= {"non_numeric", "nan", "inf"}  # "nan"/"NA"/"inf" spelled in letters are those
            elif op == "nan_cell":
                cells[j] = draw(st.sampled_from(NAN_SPELLINGS))
                row.reasons |= {"nan"}
            elif op == "inf_cell":
                cells[j] = draw(st.sampled_from(INF_SPELLINGS + ([] if PENDING_LONG_INTEGER_FIX else LONG_INTEGERS)))
                row.reasons |= {"inf"}
            elif op == "huge_cell":
                cells[j] = draw(st.sampled_from(HUGE_FINITE))
                row.beyond_float32 = True
            else:
                cells[j] = draw(st.sampled_from(LARGE_FINITE))
                row.large = True
            row.data = b",".join(cells)
        elif op == "label":
            cells[src["label_index"]] = draw(st.sampled_from([b"", b"  ", b"zz-not-a-class", b"Benign_Finalx"]))
            row.data = b",".join(cells)
            row.label_reasons |= {"missing_label", "unknown_label"}
        elif op == "not_utf8":
            k = draw(st.integers(0, len(row.data)))
            row.data = row.data[:k] + draw(st.sampled_from(NOT_UTF8)) + row.data[k:]
        elif op == "blank_line":
            lines.insert(i, Row(draw(st.sampled_from([b"", b"   ", b"\t"]))))
            continue
        elif op == "commas_line":
            lines.insert(i, Row(b"," * (len(src["columns"]) - 1), reasons={"missing_label", "repeated_header", "nan"}))
            continue
        elif op == "header":
            lines.insert(i, Row(src["header"], reasons={"repeated_header"}))
            continue
        row.touched = True
    if not any(r.data.strip() for r in lines):
        lines.append(Row(src["rows"][0], source=0))
    return Case(
        source=name, lines=lines,
        newline=draw(st.sampled_from([b"\r\n", b"\n"])), trailing_newline=draw(st.booleans()),
        classes=draw(st.sampled_from(["8", "raw", "2"])), chunk_rows=draw(st.sampled_from([7, 50_000])),
    )


# --------------------------------------------------------------------------------------------------
# The properties
# --------------------------------------------------------------------------------------------------
_TOKENIZER = []


def _tokenizer():
    if not _TOKENIZER:
        from cic_gpt2.tokenizer import load_tokenizer

        _TOKENIZER.append(load_tokenizer())
    return _TOKENIZER[0]


def _run_prepare(inp: Path, out: Path, case: Case) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = run_cli("prepare", inp, "--output", out, "--classes", case.classes, "--seed", "0",
                     "--unknown-labels", "drop", "--small-classes", "drop", "--workers", "1",
                     "--chunk-rows", str(case.chunk_rows))
    return rc, err.getvalue()


def _check_refusal(case: Case, rc: int, stderr: str, inp: Path, out: Path) -> None:
    assert rc == 2, (rc, stderr)
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("cic-gpt2 prepare: error: ")]
    assert len(errors) == 1, stderr
    message = errors[0]
    causes = case.file_errors()
    if causes:  # a bad byte anywhere refuses the whole file, naming it
        assert str(inp) in message, message
        assert any(text in message for cause, text in (("utf8", "UTF-8"),) if cause in causes), (causes, message)
    else:  # nothing in the file forces a refusal, except having nothing usable left
        assert "no usable rows" in message, (message, [r.data[:80] for r in case.lines])
    assert not out.exists(), "a refused prepare leaves no output"
    assert sorted(p.name for p in inp.parent.iterdir()) == ["in.csv"], "no temp dir left behind"


def _check_written(case: Case, out: Path) -> None:
    src = SOURCES[case.source]
    manifest = json.loads((out / "manifest.json").read_text())
    rows = case.data_rows()
    n = len(rows)
    written = sum(s["rows"] for s in manifest["splits"].values())
    dropped = manifest["dropped"]
    assert manifest["rows_read"] == n and manifest["inputs"][0]["rows"] == n, (manifest["rows_read"], n)
    assert written + sum(dropped.values()) == n, (written, dropped, n)
    assert set(dropped) <= set(encode.REASONS) | {"class_too_small", "over_max_per_class"}, dropped

    tables = [datasets.load_from_disk(str(out / s)).to_pandas() for s in prepare.SPLITS]
    row_ids = np.concatenate([t["row_id"].to_numpy() for t in tables])
    assert len(row_ids) == written == len(np.unique(row_ids)) and (row_ids >= 0).all() and (row_ids < n).all()
    by_id = {int(rid): (feat, int(lab), ids) for t in tables
             for rid, feat, lab, ids in zip(t["row_id"], t["features"], t["label"], t["input_ids"])}

    untouched_missing = 0
    for rid, row in enumerate(rows):
        must_drop = row.reasons | (row.label_reasons if case.classes != "raw" else set())
        if rid in by_id:
            assert row.any_fate or not must_drop, f"row {rid} {row.data[:120]!r} should be dropped ({must_drop})"
            feats, label, ids = by_id[rid]
            assert len(ids) > 0 or not np.any(feats), rid
            if not row.beyond_float32:
                assert np.isfinite(feats).all(), f"row {rid} written with a non-finite feature: {row.data[:200]!r}"
            if not (row.beyond_float32 or row.large):
                text = _tokenizer().decode(list(ids))
                assert INT64_OVERFLOW not in text, (rid, text)
            if row.source is not None and not row.touched:
                cells = row.data.split(b",")
                expect = np.array([float(cells[j]) for j in src["feature_index"]], dtype=np.float32)
                assert np.array_equal(np.asarray(feats, dtype=np.float32), expect), rid
                raw_label = cells[src["label_index"]].decode().strip()
                assert manifest["label_names"][label] == schema.map_label(raw_label, case.classes), rid
        elif row.source is not None and not row.touched:
            untouched_missing += 1
    assert untouched_missing <= dropped.get("class_too_small", 0), "an intact real row vanished"


def _check_encode_csvs(case: Case, inp: Path, rc: int) -> None:
    """The evaluate/predict path on the same bytes: CicError or per-row accounting with matching reasons."""
    src = SOURCES[case.source]
    label_names = list(schema.label_names("8"))
    manifest = {"format": src["format"], "features": list(schema.FEATURES_BY_FORMAT[src["format"]]),
                "template": "compact", "classes": "8", "label_column": schema.LABEL_COLUMN_BY_FORMAT[src["format"]],
                "label2id": {n: i for i, n in enumerate(label_names)}}
    kept, dropped = [], {}
    try:
        for chunk in encode.encode_csvs([inp], manifest, _tokenizer(), unknown_labels="drop",
                                        chunk_rows=case.chunk_rows):
            kept += chunk.row_ids.tolist()
            dropped.update(zip(chunk.dropped_row_ids.tolist(), chunk.dropped_reasons))
            assert len(chunk.row_ids) == len(chunk.labels) == chunk.features.shape[0] == len(chunk.input_ids)
    except CicError as e:
        assert case.file_errors() and str(inp) in str(e), e
        return
    assert not case.file_errors(), f"{case.file_errors()} accepted by encode_csvs"
    rows = case.data_rows()
    assert sorted(kept + list(dropped)) == list(range(len(rows))), "every row kept or dropped exactly once"
    for rid, row in enumerate(rows):
        if row.any_fate:
            continue
        must_drop = row.reasons | row.label_reasons  # classes 8 here
        if must_drop:
            assert dropped.get(rid) in must_drop, (rid, dropped.get(rid), must_drop, row.data[:120])
        elif row.source is not None and not row.touched:
            assert rid in kept, (rid, dropped.get(rid), row.data[:120])


# CIC_FUZZ_EXAMPLES=500 for a longer hunt; the suite runs 30 (about 10 s).
@settings(max_examples=int(os.environ.get("CIC_FUZZ_EXAMPLES", "30")), deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_prepare_never_crashes_and_accounts_for_every_row(case: Case):
    work = Path(tempfile.mkdtemp(prefix="fuzz-prepare-"))
    try:
        inp, out = work / "in.csv", work / "out"
        inp.write_bytes(case.to_bytes())
        rc, stderr = _run_prepare(inp, out, case)  # an unexpected exception fails the test with its traceback
        if rc == 0:
            assert not case.file_errors(), f"{case.file_errors()} accepted: {stderr[-500:]}"
            _check_written(case, out)
        else:
            _check_refusal(case, rc, stderr, inp, out)
        _check_encode_csvs(case, inp, rc)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Found by the fuzzer
# --------------------------------------------------------------------------------------------------
def test_values_beyond_float32_are_dropped_not_written_as_inf(tmp_path):
    """Minimal repro: one real v2 row with Rate=1e308. prepare keeps it (the float64 inf check passes) and
    writes `features` as float32 -> inf; `cic-gpt2 baseline` then refuses the whole dataset ("re-run prepare,
    which drops such rows"), which it does not."""
    src = SOURCES["v2"]
    rows = list(src["rows"][:40])
    cells = rows[0].split(b",")
    cells[src["columns"].index("Rate")] = b"1e308"
    rows[0] = b",".join(cells)
    inp = tmp_path / "in.csv"
    inp.write_bytes(b"\n".join([src["header"], *rows]) + b"\n")
    out = tmp_path / "out"
    assert run_cli("prepare", inp, "--output", out, "--classes", "8", "--small-classes", "drop") == 0
    features = np.concatenate([np.asarray(datasets.load_from_disk(str(out / s))["features"], dtype=np.float32)
                               for s in prepare.SPLITS])
    assert np.isfinite(features).all(), "a written feature is inf"
    assert json.loads((out / "manifest.json").read_text())["dropped"].get("inf") == 1


def test_large_fraction_values_are_not_rendered_as_int64_garbage():
    """Minimal repro: syn_flag_number = 1e17 (a finite float32) renders as `syn-9223372036854775808`: a
    negative, wrong number in the text the model trains on, with no drop and no error."""
    from cic_gpt2.templates import render

    features = list(schema.V2_FEATURES)
    values = np.zeros((2, len(features)))
    values[0, features.index("syn_flag_number")] = 1e17
    values[1, features.index("syn_flag_number")] = 1e30
    for text in render("compact", values, features).to_pylist():
        assert INT64_OVERFLOW not in text and "-" not in text, text


def test_integer_literals_beyond_float64_are_dropped_not_a_traceback(tmp_path):
    """Minimal repro (found by the fuzzer): one real v2 row with `Protocol Type` (an integer column) set to 400
    nines. `pd.to_numeric(..., errors="coerce")` raises OverflowError ("int too large to convert to float"),
    which is no CicError: `cic-gpt2 prepare` (and evaluate/predict through encode_csvs) die with a traceback.
    Expected: the row dropped with reason inf (Python's float("9" * 400) is inf), like 1e400 already is."""
    src = SOURCES["v2"]
    rows = list(src["rows"][:40])
    cells = rows[0].split(b",")
    cells[src["columns"].index("Protocol Type")] = LONG_INTEGERS[0]
    rows[0] = b",".join(cells)
    inp = tmp_path / "in.csv"
    inp.write_bytes(b"\n".join([src["header"], *rows]) + b"\n")
    out = tmp_path / "out"
    assert run_cli("prepare", inp, "--output", out, "--classes", "8", "--small-classes", "drop") == 0
    assert json.loads((out / "manifest.json").read_text())["dropped"].get("inf") == 1
