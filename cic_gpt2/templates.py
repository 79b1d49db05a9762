"""Row -> text: the serializations of a CICIoT2023 flow (`compact`, `seed`, `kv`, `binned`), vectorized.

`render(template, values, feature_names, binning)` works on whole columns of a chunk; `render_row` renders one
row. `binned` (one word per feature, its train-split quantile bin) lives in `cic_gpt2.binning`.
What each template writes and why: docs/prepare.md ("Templates", "How it scales").
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cic_gpt2.schema import FRACTION_FEATURES

TEMPLATES = ("compact", "seed", "kv", "binned")
# What a prepared text-format CSV reports as its template: its text column passes through unrendered.
TEXT_TEMPLATE = "text"
SEED_MAX_CHARS = 400

# Short keys, each ONE GPT-2 token after a space (tests check it). Duration (v1) and Time_To_Live (v2) are
# both the TTL, so they share a key.
COMPACT_KEYS: dict[str, str] = {
    "flow_duration": "dur", "Header_Length": "head", "Protocol Type": "pt", "Duration": "TTL",
    "Time_To_Live": "TTL", "Rate": "rate", "Srate": "sr", "Drate": "dr",
    "fin_flag_number": "fin", "syn_flag_number": "syn", "rst_flag_number": "rs", "psh_flag_number": "ps",
    "ack_flag_number": "ak", "ece_flag_number": "ec", "cwr_flag_number": "cr",
    "ack_count": "ac", "syn_count": "sc", "fin_count": "fn", "urg_count": "ur", "rst_count": "rc",
    "HTTP": "http", "HTTPS": "https", "DNS": "DNS", "Telnet": "tel", "SMTP": "mail", "SSH": "ssh", "IRC": "IRC",
    "TCP": "tcp", "UDP": "UDP", "DHCP": "DHCP", "ARP": "ar", "ICMP": "ping", "IGMP": "ig", "IPv": "ip",
    "LLC": "LLC", "Tot sum": "sum", "Min": "min", "Max": "max", "AVG": "avg", "Std": "std", "Tot size": "size",
    "IAT": "gap", "Number": "n", "Magnitue": "mag", "Radius": "rad", "Covariance": "cov", "Variance": "var",
    "Weight": "w",
}


def render(template: str, values: np.ndarray, feature_names: Sequence[str], binning: dict | None = None
           ) -> pa.StringArray:
    """Texts of n rows: `values` is an (n, len(feature_names)) float array of finite numbers. `binning`: the
    manifest's bin edges (template `binned` only; None there renders "" before the edges are fitted)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(feature_names):
        raise ValueError(f"render: values shape {values.shape} does not match {len(feature_names)} features")
    if template == "compact":
        return _render_compact(values, list(feature_names))
    if template == "seed":
        return _render_seed(values, list(feature_names))
    if template == "kv":
        return _render_kv(values, list(feature_names))
    if template == "binned":
        from cic_gpt2.binning import render as render_binned

        return render_binned(values, list(feature_names), binning)
    raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def render_row(template: str, row: dict[str, float], binning: dict | None = None) -> str:
    """One row's text (for docs and tests; batch work goes through `render`)."""
    names = list(row)
    return render(template, np.array([[row[n] for n in names]], dtype=np.float64), names, binning)[0].as_py()


# ---------------------------------------------------------------------------------------------- helpers
# Omitted pieces are "" and kept pieces carry their separator in front, so a row is the plain concatenation
# of its pieces minus the first separator. (No nulls: pyarrow 26's null_handling="skip" drops rows whose
# pieces are all null.)
def _map_distinct(column: np.ndarray, fmt, sep: str = "") -> pa.Array:
    """sep + fmt(value), or "" where fmt returns None; fmt runs once per distinct value of the column."""
    codes, uniques = pd.factorize(column, use_na_sentinel=False)
    table = pa.array([("" if w is None else sep + w) for w in map(fmt, uniques.tolist())], type=pa.string())
    return table.take(pa.array(codes, type=pa.int32()))


def _concat(pieces: list[pa.Array], sep: str) -> pa.Array:
    """Concatenate separator-prefixed pieces row-wise and drop the leading separator."""
    joined = pieces[0] if len(pieces) == 1 else pc.binary_join_element_wise(*pieces, "")
    return pc.utf8_slice_codeunits(joined, len(sep)) if sep else joined


def _opt(prefix: str, arr: pa.Array) -> pa.Array:
    """prefix + arr where arr is non-empty, else ""."""
    return pc.if_else(pc.equal(arr, ""), "", pc.binary_join_element_wise(pa.scalar(prefix), arr, ""))


# ---------------------------------------------------------------------------------------------- compact
def _sig2(values: np.ndarray) -> np.ndarray:
    """Encode each value rounded to 2 significant digits as one int64: sign * (exp_code*100 + mantissa).

    value = mantissa * 10**(exp_code - 400), mantissa in 10..99 (0 stays 0). Exact integer arithmetic
    afterwards: no float noise in the rendered digits.
    """
    mag = np.abs(values)
    nonzero = mag > 0
    exp = np.zeros(values.shape, dtype=np.int64)
    exp[nonzero] = np.floor(np.log10(mag[nonzero])).astype(np.int64) - 1  # mantissa has 2 digits
    mant = np.zeros(values.shape, dtype=np.int64)
    mant[nonzero] = np.rint(mag[nonzero] / np.power(10.0, exp[nonzero])).astype(np.int64)
    # log10 rounding and rint can land on 9.96 -> 100 or just below 10: renormalize to 10..99.
    over = mant >= 100
    mant[over] = np.rint(mant[over] / 10).astype(np.int64)
    exp[over] += 1
    under = nonzero & (mant < 10)
    mant[under] = np.rint(mag[under] / np.power(10.0, exp[under] - 1)).astype(np.int64)
    exp[under] -= 1
    return np.sign(values).astype(np.int64) * ((exp + 400) * 100 + mant) * nonzero


_SI = ((12, "T"), (9, "G"), (6, "M"), (3, "k"))


def _compact_number(code: int) -> str | None:
    if code == 0:
        return None
    sign = "-" if code < 0 else ""
    code = abs(code)
    mant, exp = code % 100, code // 100 - 400
    while mant % 10 == 0:  # 10..99 -> drop trailing zeros: 60 -> 6 * 10
        mant //= 10
        exp += 1
    if exp >= 0:
        if mant * 10**exp < 10_000:
            return f"{sign}{mant * 10**exp}"
        power, suffix = next((p, s) for p, s in _SI if exp >= p)
        return f"{sign}{mant * 10**(exp - power)}{suffix}"
    digits = str(mant)
    if len(digits) > -exp:
        return f"{sign}{digits[:exp]}.{digits[exp:]}"
    return f"{sign}.{'0' * (-exp - len(digits))}{digits}"


def _render_compact(values: np.ndarray, names: list[str]) -> pa.Array:
    words = []
    for j, name in enumerate(names):
        key = COMPACT_KEYS.get(name, name.replace(" ", "_"))
        if name in FRACTION_FEATURES:
            # clip before the int cast: a fraction column never legitimately exceeds a few hundred percent,
            # and an unclipped 1e17 would wrap to a negative int64
            pct = np.rint(np.clip(values[:, j] * 100, -1e15, 1e15)).astype(np.int64)
            words.append(_map_distinct(pct, lambda v, k=key: f"{k}{v}" if v else None, " "))
        else:
            codes = _sig2(values[:, j])
            words.append(_map_distinct(codes, lambda c, k=key: None if c == 0 else k + _compact_number(c), " "))
    return _concat(words, " ")  # a row whose every field is zero serializes to ""


# ---------------------------------------------------------------------------------------------- seed
_SEED_FLAGS = (("fin_flag_number", "FIN"), ("syn_flag_number", "SYN"), ("rst_flag_number", "RST"),
               ("psh_flag_number", "PSH"), ("ack_flag_number", "ACK"), ("ece_flag_number", "ECE"),
               ("cwr_flag_number", "CWR"))
_SEED_COUNTS = (("ack_count", "ACK"), ("syn_count", "SYN"), ("fin_count", "FIN"), ("urg_count", "URG"),
                ("rst_count", "RST"))
_SEED_SERVICES = ("HTTP", "HTTPS", "DNS", "Telnet", "SMTP", "SSH", "IRC", "TCP", "UDP", "DHCP", "ARP", "ICMP",
                  "IPv", "LLC")
# (column, phrase, keep when) -- keep: "pos" value > 0, "nz" value != 0 (as the original pipeline tests them)
_SEED_STATS = (("Tot sum", "total sum", "pos"), ("Tot size", "total size", "pos"), ("Min", "minimum", "nz"),
               ("Max", "maximum", "pos"), ("AVG", "average", "pos"), ("Std", "standard deviation", "pos"))
_SEED_ADVANCED = (("IAT", "inter-arrival time", "pos"), ("Number", "number", "pos"),
                  ("Magnitue", "magnitude", "pos"), ("Radius", "radius", "pos"),
                  ("Covariance", "covariance", "nz"), ("Variance", "variance", "pos"),
                  ("Weight", "weight", "pos"))


def _render_seed(values: np.ndarray, names: list[str]) -> pa.Array:
    n = len(values)
    index = {name: j for j, name in enumerate(names)}

    def col(name: str) -> np.ndarray:  # absent columns read as 0, like the original row.get(name, 0)
        return values[:, index[name]] if name in index else np.zeros(n)

    def f4(phrase: str, keep: str):
        return lambda v: f"{phrase} {v:.4f}" if (v > 0 if keep == "pos" else v != 0) else None

    flow_duration, duration = col("flow_duration"), col("Duration")
    parts = [_map_distinct(flow_duration, lambda v: f"Network flow with duration {v:.4f} seconds", ". ")]
    # "total duration" only where Duration differs from flow_duration and is positive.
    total = _map_distinct(duration, f4("total duration", "pos"), ". ")
    parts.append(pc.if_else(pa.array(duration != flow_duration), total, ""))
    parts.append(_map_distinct(col("Header_Length"),
                               lambda v: f"header length {int(v)} bytes" if v > 0 else None, ". "))
    protocol_names = {6.0: "using TCP protocol", 17.0: "using UDP protocol", 1.0: "using ICMP protocol"}
    parts.append(_map_distinct(col("Protocol Type"), lambda v: protocol_names.get(v) or (
        f"using protocol {int(v)}" if v > 0 else None), ". "))
    for name, phrase in (("Rate", "overall rate"), ("Srate", "source rate"), ("Drate", "destination rate")):
        parts.append(_map_distinct(col(name), f4(phrase, "pos"), ". "))
    flags = [_map_distinct(col(c), lambda v, f=f: f"{int(v)} {f}" if v > 0 else None, ", ") for c, f in _SEED_FLAGS]
    parts.append(_opt(". TCP flags: ", _concat(flags, ", ")))
    counts = [_map_distinct(col(c), lambda v, f=f: f"{int(v)} {f} count" if v > 0 else None, ", ")
              for c, f in _SEED_COUNTS]
    parts.append(_opt(". Flag counts: ", _concat(counts, ", ")))
    services = [_map_distinct(col(s), lambda v, s=s: s if v > 0 else None, ", ") for s in _SEED_SERVICES]
    parts.append(_opt(". Services: ", _concat(services, ", ")))
    stats = [_map_distinct(col(c), f4(p, k), ", ") for c, p, k in _SEED_STATS]
    parts.append(_opt(". Statistics: ", _concat(stats, ", ")))
    advanced = [_map_distinct(col(c), f4(p, k), ", ") for c, p, k in _SEED_ADVANCED]
    parts.append(_opt(". Advanced metrics: ", _concat(advanced, ", ")))
    text = _concat(parts, ". ")  # part 1 is always present
    too_long = pc.greater(pc.utf8_length(text), SEED_MAX_CHARS)
    cut = pc.binary_join_element_wise(pc.utf8_slice_codeunits(text, 0, SEED_MAX_CHARS), pa.scalar("..."), "")
    return pc.if_else(too_long, cut, text)


# ---------------------------------------------------------------------------------------------- kv
def _render_kv(values: np.ndarray, names: list[str]) -> pa.Array:
    # Arrow's float -> string cast writes the shortest round-trip decimal in C++ (64.0 -> "64").
    pieces = [pc.binary_join_element_wise(pa.scalar(f" {name}:"), pc.cast(pa.array(values[:, j]), pa.string()), "")
              for j, name in enumerate(names)]
    return _concat(pieces, " ")
