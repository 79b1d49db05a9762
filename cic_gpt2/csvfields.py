"""Fields per CSV record, counted from the raw bytes beside pandas' reader.

pandas fills the missing cells of a short row with NaN, so a row cut short (a truncated line, a file that
ends mid-row) looks like a row of empty cells: without the count, its reason would be a guess (`nan`,
`missing_label`). `field_counts(path)` yields one count per data record, in the order pandas reads them
(header skipped; empty and whitespace-only lines skipped, as pandas' `skip_blank_lines` does), so the
encode path can take `len(chunk)` counts per chunk. A record that ends the file without a newline is
yielded negated (-n), so a cut final row can be told apart (`truncated`).

Quoted fields follow the csv module (a quote opens a field only at its start; `""` inside is a quote; a
record may span lines); lines without a quote, all of CICIoT2023, take the fast path (one `bytes.count`).
"""
from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path


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


def field_counts(path: str | Path) -> Iterator[int]:
    """Field count of each data record of `path`; -count for a last record without a final newline."""
    with open(path, "rb") as f:
        lines = iter(f)
        header = next(lines, b"")
        if b'"' in header:
            _quoted_record(header, lines)
        for line in lines:
            if b'"' in line:
                n, line = _quoted_record(line, lines)
            elif not line.strip():
                continue  # pandas skips blank lines
            else:
                n = line.count(b",") + 1
            yield n if line.endswith(b"\n") else -n
