"""membership.py: the training-vector set an export carries (exact sorted hashes or a Bloom filter)."""
import numpy as np
import pytest

from cic_gpt2.membership import Membership


def test_exact_set_answers_exactly_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 2**63, 5000, dtype=np.uint64)
    other = rng.integers(0, 2**63, 5000, dtype=np.uint64)
    m = Membership.build(np.concatenate([train, train[:100]]))  # duplicates collapse
    assert m.kind == "exact" and m.num_items == 5000 and m.fp_rate == 0.0
    assert m.contains(train).all() and not m.contains(other).any()
    m.save(tmp_path / "m.npz")
    again = Membership.load(tmp_path / "m.npz")
    assert again.kind == "exact" and np.array_equal(again.data, m.data)
    assert not Membership.build(np.zeros(0, dtype=np.uint64)).contains(train).any()


def test_bloom_filter_never_misses_and_keeps_its_false_positive_rate(tmp_path):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 2**64 - 1, 20_000, dtype=np.uint64)
    other = rng.integers(0, 2**64 - 1, 200_000, dtype=np.uint64)
    m = Membership.build(train, exact_max=1000, fp_rate=0.01)
    assert m.kind == "bloom" and m.data.nbytes < train.nbytes / 5  # ~10 bits per item, not 64
    assert m.contains(train).all()
    measured = m.contains(other).mean()
    assert measured < 0.02 and m.fp_rate == pytest.approx(0.01, rel=0.3), (measured, m.fp_rate)
    m.save(tmp_path / "b.npz")
    assert np.array_equal(Membership.load(tmp_path / "b.npz").contains(other), m.contains(other))
