"""Fields per CSV record, counted from the raw bytes beside pandas' reader.

pandas fills the missing cells of a short row with NaN, so a row cut short (a truncated line, a file that
ends mid-row) looks like a row of empty cells: without the count, its reason would be a guess (`nan`,
`missing_label`). `field_counts(path)` yields one count per data record, in the order pandas reads them
(header skipped; empty and whitespace-only lines skipped, as pandas' `skip_blank_lines` does), so the
encode path can take `len(chunk)` counts per chunk. A record that ends the file without a newline is
yielded negated (-n), so a cut final row can be told apart (`truncated`).

Quoted fields follow the csv module (a quote opens a field only at its start; `""` inside is a quote; a
record may span lines), line by line from the first quote on; until then (all of CICIoT2023) commas are
counted per 4 MiB block with numpy.
"""
from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np

MAX_LINE_BYTES = 1 << 26
"""A longer line means the file's lines do not end in '\n': its remaining records are not counted (not flagged)."""


def _quoted_record(first: bytes, lines: Iterator[bytes]) -> tuple[int, bytes]:
    """(fields, last line) of the record that starts with `first`: the csv module reads exactly as many
    further lines from `lines` as the record's open quotes need."""
    last = [first]

    def text_lines():
        yield first.decode("utf-8", "replace")
        for more in lines:
            last[0] = more
            yield more.decode("utf-8", "replace")

    row = next(csv.reader(text_lines()), [])
    return max(len(row), 1), last[0]


def _unquoted_counts(data: bytes) -> np.ndarray:
    """Field counts of the lines of `data` (complete lines, no quote character), blank lines skipped."""
    arr = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(arr == 10)
    commas = np.searchsorted(np.flatnonzero(arr == 44), ends)
    counts = np.diff(commas, prepend=0) + 1
    keep = np.ones(len(ends), dtype=bool)
    for i in np.flatnonzero(counts == 1):  # a line without a comma may be blank (rare: check those only)
        start = ends[i - 1] + 1 if i else 0
        keep[i] = bool(data[start:ends[i]].strip())
    return counts[keep]


def field_counts(path: str | Path, block_bytes: int = 1 << 22) -> Iterator[int | np.ndarray]:
    """Field count of each data record of `path` (an int, or an array of consecutive counts); -count for a
    last record without a final newline. `Counts` takes them n at a time."""
    with open(path, "rb") as f:
        header = f.readline()
        if b'"' in header:
            _quoted_record(header, iter(f))
        rest = b""
        while block := f.read(block_bytes):
            data = rest + block
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                if len(data) > MAX_LINE_BYTES:  # no newline at all ('\r' line ends?): stop counting
                    return
                rest = data
                continue
            data, rest = data[:cut], data[cut:]
            if b'"' in data or b'"' in rest:  # quoting from here on: line by line, the csv module's rules
                yield from _line_counts(itertools.chain(io.BytesIO(data + rest + f.readline()), f))
                return
            yield _unquoted_counts(data)
        if rest.strip():
            yield from _line_counts(iter([rest]))


def _line_counts(lines: Iterator[bytes]) -> Iterator[int]:
    for line in lines:
        if b'"' in line:
            n, line = _quoted_record(line, lines)
        elif not line.strip():
            continue  # pandas skips blank lines
        else:
            n = line.count(b",") + 1
        yield n if line.endswith(b"\n") else -n


class Counts:
    """`field_counts(path)`, taken `n` records at a time (as pandas' chunks come)."""

    def __init__(self, path: str | Path, block_bytes: int = 1 << 22):
        self._source = field_counts(path, block_bytes)
        self._pending = np.zeros(0, dtype=np.int64)

    def take(self, n: int) -> np.ndarray:
        """The next `n` counts (fewer when the file has no more records)."""
        parts, have = [self._pending], len(self._pending)
        while have < n:
            item = next(self._source, None)
            if item is None:
                break
            item = np.atleast_1d(np.asarray(item, dtype=np.int64))
            parts.append(item)
            have += len(item)
        counts = np.concatenate(parts)
        self._pending = counts[n:]
        return counts[:n]
