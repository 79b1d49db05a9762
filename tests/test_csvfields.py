"""`csvfields`: fields per record counted from the raw bytes, row for row with pandas' reader, on real rows."""
from __future__ import annotations

import pandas as pd
import pytest

from cic_gpt2.csvfields import Counts
from conftest import SAMPLE_V2


def _all(path, block_bytes: int, step: int) -> list[int]:
    counts, out = Counts(path, block_bytes), []
    while len(part := counts.take(step)):
        out += part.tolist()
    return out


@pytest.mark.parametrize("block_bytes", [7, 4096, 1 << 22])
def test_counts_follow_pandas_rows(tmp_path, block_bytes):
    lines = SAMPLE_V2.read_bytes().split(b"\r\n")[:60]
    header, rows = lines[0], lines[1:]
    n = header.count(b",") + 1
    rows[5] = rows[5][:40]  # a line cut short
    rows[9:9] = [b"", b"   ", b"\t"]  # blank lines are no rows (pandas skips them)
    rows[20] = b'"1,5",' + rows[20].split(b",", 1)[1]  # a quoted cell holding a comma
    rows[30] = b'"multi\nline",' + rows[30].split(b",", 1)[1]  # a quoted cell across two lines
    rows[-1] = rows[-1][:25]  # the file ends mid-row, no final newline
    path = tmp_path / "rows.csv"
    path.write_bytes(b"\r\n".join([header, *rows]))
    frame = pd.read_csv(path, skipinitialspace=True, index_col=False)
    got = _all(path, block_bytes, 13)
    assert len(got) == len(frame) == 59
    assert got[5] == rows[5].count(b",") + 1 < n and got[-1] == -(rows[-1].count(b",") + 1)
    assert all(c == n for i, c in enumerate(got) if i not in (5, len(got) - 1))
    # rows[20] and rows[30] are data rows 17 and 27 (three blank lines before them)
    assert frame.iloc[17, 0] == "1,5" and frame.iloc[27, 0] == "multi\nline"
