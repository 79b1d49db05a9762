"""Row -> text templates on the real bundled rows of both schemas."""
import re

import numpy as np
import pandas as pd
import pytest

from cic_gpt2 import schema
from cic_gpt2.templates import COMPACT_KEYS, TEMPLATES, _compact_number, _sig2, render, render_row
from cic_gpt2.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module", params=["v1", "v2"])
def rows(request, sample_v1, sample_v2):
    path = sample_v1 if request.param == "v1" else sample_v2
    features = schema.FEATURES_BY_FORMAT[request.param]
    return features, pd.read_csv(path)[list(features)].to_numpy(np.float64)


def seed_reference(row: dict) -> str:
    """The original pipeline's sentences, written row by row from its description (the check for the
    vectorized version)."""
    g = lambda k: row.get(k, 0)  # noqa: E731
    parts = [f"Network flow with duration {g('flow_duration'):.4f} seconds"]
    if g("Duration") != g("flow_duration") and g("Duration") > 0:
        parts.append(f"total duration {g('Duration'):.4f}")
    if g("Header_Length") > 0:
        parts.append(f"header length {int(g('Header_Length'))} bytes")
    proto = g("Protocol Type")
    if proto in (6, 17, 1):
        parts.append(f"using {({6: 'TCP', 17: 'UDP', 1: 'ICMP'})[proto]} protocol")
    elif proto > 0:
        parts.append(f"using protocol {int(proto)}")
    for k, name in (("Rate", "overall"), ("Srate", "source"), ("Drate", "destination")):
        if g(k) > 0:
            parts.append(f"{name} rate {g(k):.4f}")
    flags = [f"{int(g(k + '_flag_number'))} {k.upper()}" for k in ("fin", "syn", "rst", "psh", "ack", "ece", "cwr")
             if g(k + "_flag_number") > 0]
    if flags:
        parts.append("TCP flags: " + ", ".join(flags))
    counts = [f"{int(g(k + '_count'))} {k.upper()} count" for k in ("ack", "syn", "fin", "urg", "rst") if g(k + "_count") > 0]
    if counts:
        parts.append("Flag counts: " + ", ".join(counts))
    services = [s for s in ("HTTP", "HTTPS", "DNS", "Telnet", "SMTP", "SSH", "IRC", "TCP", "UDP", "DHCP", "ARP",
                            "ICMP", "IPv", "LLC") if g(s) > 0]
    if services:
        parts.append("Services: " + ", ".join(services))
    stats = [f"{p} {g(k):.4f}" for k, p in (("Tot sum", "total sum"), ("Tot size", "total size"), ("Min", "minimum"),
                                            ("Max", "maximum"), ("AVG", "average"), ("Std", "standard deviation"))
             if (g(k) != 0 if k == "Min" else g(k) > 0)]
    if stats:
        parts.append("Statistics: " + ", ".join(stats))
    adv = [f"{p} {g(k):.4f}" for k, p in (("IAT", "inter-arrival time"), ("Number", "number"), ("Magnitue", "magnitude"),
                                          ("Radius", "radius"), ("Covariance", "covariance"), ("Variance", "variance"),
                                          ("Weight", "weight")) if (g(k) != 0 if k == "Covariance" else g(k) > 0)]
    if adv:
        parts.append("Advanced metrics: " + ", ".join(adv))
    text = ". ".join(parts)
    return text[:400] + "..." if len(text) > 400 else text


def test_seed_matches_the_original_sentences_on_every_real_row(rows):
    features, values = rows
    texts = render("seed", values, features).to_pylist()
    expected = [seed_reference(dict(zip(features, r))) for r in values.tolist()]
    assert texts == expected
    assert any(t.endswith("...") and len(t) == 403 for t in texts)  # the 400-character cut is exercised


def test_compact_first_v2_row_exact(sample_v2):
    row = pd.read_csv(sample_v2).iloc[0]
    text = render_row("compact", {f: float(row[f]) for f in schema.V2_FEATURES})
    assert text == "head32 pt6 TTL64 ak100 ac10 https100 tcp100 ip100 LLC100 sum660 min66 max66 avg66 size66 n10"


@pytest.mark.parametrize("value,text", [
    (64.0, "64"), (660.0, "660"), (16588.0, "17k"), (83340575.04, "83M"), (1658.8, "1700"), (6.11, "6.1"),
    (0.00021, ".00021"), (0.8, ".8"), (99.6, "100"), (9.96, "10"), (-2.5, "-2.5"), (1514.0, "1500"),
    (170000.0, "170k"), (3.2e10, "32G"), (9999.0, "10k"), (0.0, None),
])
def test_compact_numbers_keep_two_significant_digits(value, text):
    assert _compact_number(int(_sig2(np.array([value]))[0])) == text


def test_compact_keys_are_single_gpt2_tokens_and_unique_per_schema(tok):
    for key in set(COMPACT_KEYS.values()):
        assert len(tok(" " + key)["input_ids"]) == 1, key
    for fmt in ("v1", "v2"):
        keys = [COMPACT_KEYS[f] for f in schema.FEATURES_BY_FORMAT[fmt]]
        assert len(keys) == len(set(keys)), fmt


def test_compact_omits_zero_fields_and_carries_the_rest(rows):
    features, values = rows
    texts = render("compact", values, features).to_pylist()
    for text, row in zip(texts[:200], values[:200]):
        keys = {re.match(r"[A-Za-z]+", w).group(0) for w in text.split()}
        for name, v in zip(features, row):
            fraction = name in schema.FRACTION_FEATURES
            shown = round(v * 100) != 0 if fraction else v != 0
            assert (COMPACT_KEYS[name] in keys) == shown, (name, v, text)


def test_kv_has_every_name_value_exactly(rows):
    features, values = rows
    for text, row in zip(render("kv", values, features).to_pylist()[:100], values[:100]):
        for name, v in zip(features, row):
            assert f"{name}:" in text
        for k, f in enumerate(features[1:], 1):  # parse back: "name:value" pairs in feature order
            before, after = text.split(f"{f}:", 1)
            assert float(before.rsplit(":", 1)[1].strip()) == row[k - 1]


def test_compact_uses_at_most_half_of_seed_tokens(rows, tok):
    features, values = rows
    mean = {t: np.mean([len(ids) for ids in tok(render(t, values, features).to_pylist())["input_ids"]])
            for t in TEMPLATES}
    assert mean["compact"] <= 0.5 * mean["seed"], mean
    assert mean["seed"] < mean["kv"]


def test_render_rejects_bad_shapes_and_templates():
    with pytest.raises(ValueError, match="does not match"):
        render("compact", np.zeros((2, 3)), ["Rate"])
    with pytest.raises(ValueError, match="unknown template"):
        render("poem", np.zeros((1, 1)), ["Rate"])
