"""data.py: the global-batch contract, resume, length grouping, class balancing, collate; prepared.py: dataset
checks."""
import copy
import json

import numpy as np
import pytest

from cic_gpt2.config import DataConfig
from cic_gpt2.prepared import Prepared, check_tokenizer
from cic_gpt2.data import (
    balanced_draw, class_weights, collate, global_batches, rank_micro_batches, train_batches,
)
from cic_gpt2.errors import DataError
from cic_gpt2.tokenizer import load_tokenizer

# (micro_batch_size, grad_accum, world_size): all G = 4
SPLITS_OF_4 = [(4, 1, 1), (1, 4, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)]


def step_examples(batches, step, micro, accum, world):
    """Rows of one optimizer step as the ranks/micro-batches see them, rank-major then micro-batch order."""
    out = []
    for rank in range(world):
        parts = rank_micro_batches(batches[step], rank, world, accum)
        assert [len(p) for p in parts] == [micro] * accum
        out.extend(np.concatenate(parts).tolist())
    return out


@pytest.mark.parametrize("lengths", [None, "random"])
def test_every_split_of_the_global_batch_sees_the_same_examples(lengths):
    n = 103
    lens = np.random.default_rng(5).integers(3, 60, n) if lengths else None
    reference = None
    for micro, accum, world in SPLITS_OF_4:
        batches = global_batches(n, seed=7, epoch=2, global_batch_size=micro * accum * world, lengths=lens)
        seen = [step_examples(batches, k, micro, accum, world) for k in range(len(batches))]
        reference = reference or seen
        assert seen == reference, (micro, accum, world)
    assert len(reference) == n // 4  # incomplete last global batch dropped
    flat = [i for step in reference for i in step]
    assert len(set(flat)) == len(flat) == (n // 4) * 4  # each example at most once per epoch


def test_permutation_depends_on_seed_and_epoch_only():
    a = global_batches(50, seed=1, epoch=0, global_batch_size=8)
    assert np.array_equal(a, global_batches(50, seed=1, epoch=0, global_batch_size=8))
    assert not np.array_equal(a, global_batches(50, seed=1, epoch=1, global_batch_size=8))
    assert not np.array_equal(a, global_batches(50, seed=2, epoch=0, global_batch_size=8))


def test_length_grouping_keeps_the_epoch_and_cuts_padding():
    n, g = 640, 8
    lengths = np.random.default_rng(0).integers(5, 200, n)
    plain = global_batches(n, 3, 0, g)
    grouped = global_batches(n, 3, 0, g, lengths)
    assert sorted(plain.ravel().tolist()) == sorted(grouped.ravel().tolist())
    padded = lambda b: int(sum(lengths[row].max() * len(row) for row in b))  # noqa: E731
    assert padded(grouped) < 0.8 * padded(plain)
    assert lengths[grouped[0]].max() == lengths.max()  # the longest batch runs first (an OOM shows at once)
    assert not np.array_equal(grouped, global_batches(n, 3, 1, g, lengths))  # still shuffled per epoch


def test_class_weights_on_a_known_count_table():
    counts = [100, 10, 1, 0]  # n = 111 rows, C = 3 classes with rows
    assert class_weights(counts, "none") is None
    balanced = class_weights(counts, "balanced")
    np.testing.assert_allclose(balanced, [111 / 300, 111 / 30, 111 / 3, 0.0], rtol=1e-12)  # n / (C n_c)
    from sklearn.utils.class_weight import compute_class_weight

    y = np.repeat([0, 1, 2], counts[:3])
    np.testing.assert_allclose(balanced[:3], compute_class_weight("balanced", classes=np.arange(3), y=y))
    sqrt = class_weights(counts, "sqrt")  # n / (sqrt(n_c) * sum_c sqrt(n_c))
    root_sum = 10 + 10**.5 + 1
    np.testing.assert_allclose(sqrt, [111 / (10 * root_sum), 111 / (10**.5 * root_sum), 111 / root_sum, 0.0],
                               rtol=1e-12)
    for w in (balanced, sqrt):  # an example drawn by `shuffle` weighs 1 on average
        assert np.dot(counts, w) / sum(counts) == pytest.approx(1.0)
    # with the balanced sampler every class with rows is drawn equally often: its mean class weight is 1
    for mode, raw in (("balanced", [1 / 100, 1 / 10, 1.0]), ("sqrt", [1 / 10, 10**-.5, 1.0])):
        w = class_weights(counts, mode, sampler="balanced")
        np.testing.assert_allclose(w[:3], np.array(raw) / np.mean(raw), rtol=1e-12)
        assert w[3] == 0.0 and w[:3].mean() == pytest.approx(1.0)


@pytest.mark.parametrize("lengths", [None, "random"])
def test_balanced_sampler_keeps_the_global_batch_contract(lengths):
    n = 103
    labels = np.repeat([0, 1, 2, 4], [80, 15, 6, 2])[np.random.default_rng(1).permutation(n)]  # class 3: none
    lens = np.random.default_rng(5).integers(3, 60, n) if lengths else None
    reference = None
    for micro, accum, world in SPLITS_OF_4:
        batches = global_batches(n, seed=7, epoch=2, global_batch_size=micro * accum * world, lengths=lens,
                                 labels=labels)
        seen = [step_examples(batches, k, micro, accum, world) for k in range(len(batches))]
        reference = reference or seen
        assert seen == reference, (micro, accum, world)
    assert len(reference) == n // 4  # as many steps as the shuffled epoch
    again = global_batches(n, seed=7, epoch=2, global_batch_size=4, lengths=lens, labels=labels)
    assert np.array_equal(again, global_batches(n, 7, 2, 4, lens, labels))  # (seed, epoch) alone
    assert not np.array_equal(again, global_batches(n, 7, 3, 4, lens, labels))
    assert not np.array_equal(again, global_batches(n, 8, 2, 4, lens, labels))
    if lengths:  # grouping re-forms batches from the same draw
        plain = global_batches(n, 7, 2, 4, labels=labels)
        assert sorted(plain.ravel().tolist()) == sorted(again.ravel().tolist())
    # a longer draw extends a shorter one: the examples do not depend on the epoch's length
    assert np.array_equal(balanced_draw(labels, 7, 2, 1000)[:40], balanced_draw(labels, 7, 2, 40))


def test_balanced_sampler_draws_classes_uniformly_on_real_rows(prepared_v2):
    prepared = Prepared.load(prepared_v2)
    labels = prepared.split("train").with_format("numpy")["label"]
    counts = np.bincount(labels, minlength=len(prepared.label_names))
    assert counts.tolist() == prepared.class_counts("train")
    present = np.flatnonzero(counts)
    assert 2 <= len(present) < len(counts)  # the sample lacks some groups (Web, BruteForce)
    assert counts[present].max() >= 10 * counts[present].min()  # and is imbalanced (DDoS vs Benign)
    drawn = np.concatenate([global_batches(len(labels), 0, e, 8, labels=labels).ravel() for e in range(3)])
    freq = np.bincount(labels[drawn], minlength=len(counts)) / len(drawn)
    assert set(np.flatnonzero(freq)) == set(present)  # classes without rows are never drawn
    np.testing.assert_allclose(freq[present], 1 / len(present), rtol=0.1)  # ~9,700 draws: sd ~2.3%
    rows_of_rarest = np.flatnonzero(labels == present[np.argmin(counts[present])])
    assert set(drawn[np.isin(drawn, rows_of_rarest)]) == set(rows_of_rarest)  # each of its rows is used


def test_collate_right_pads_with_eos_to_a_multiple_and_truncates():
    b = collate([[5, 6, 7], [1] * 10], [2, 0], [11, 12], pad_token_id=50256, pad_to_multiple_of=8)
    assert b["input_ids"].shape == (2, 16)
    assert b["input_ids"][0].tolist() == [5, 6, 7] + [50256] * 13
    assert b["attention_mask"].sum(1).tolist() == [3, 10]
    assert b["labels"].tolist() == [2, 0] and b["index"].tolist() == [11, 12]
    t = collate([[1] * 30, [2] * 5], [0, 1], [0, 1], pad_token_id=0, max_length=12, pad_to_multiple_of=8)
    assert t["input_ids"].shape == (2, 12) and t["attention_mask"].sum(1).tolist() == [12, 5]


def test_train_batches_on_prepared_data_resume_and_split_invariance(prepared_v2):
    prepared = Prepared.load(prepared_v2)
    train = prepared.split("train")
    tok = load_tokenizer(None)
    cfg = DataConfig(group_by_length=True)

    def rows(micro, accum, world, start_step=0, steps=3):
        per_step = []
        iters = [train_batches(train, epoch=1, start_step=start_step, seed=0, micro_batch_size=micro,
                               grad_accum=accum, rank=r, world_size=world, tokenizer=tok, data_cfg=cfg)
                 for r in range(world)]
        for _ in range(steps):
            step = [next(it) for it in iters]
            assert all(len(mb) == accum for mb in step)
            per_step.append([i for mb in step for b in mb for i in b["index"].tolist()])
            for mb in step:
                for b in mb:
                    assert b["input_ids"].shape[1] % 8 == 0
                    lens = b["attention_mask"].sum(1)
                    for i, row, n in zip(b["index"].tolist(), b["input_ids"], lens.tolist()):
                        assert row[:n].tolist() == list(train[i]["input_ids"])
                        assert (row[n:] == tok.eos_token_id).all()
        return per_step

    full = rows(4, 1, 1, steps=5)
    assert rows(1, 4, 1) == full[:3] == rows(2, 1, 2)
    assert rows(4, 1, 1, start_step=2) == full[2:5]
    cfg = DataConfig(group_by_length=True, sampler="balanced")
    balanced = rows(4, 1, 1, steps=5)
    assert balanced != full
    assert rows(1, 4, 1) == balanced[:3] == rows(2, 1, 2)  # same contract as the shuffle
    assert rows(2, 1, 2, start_step=2) == balanced[2:5]  # exact resume at step 2
    assert balanced == [step.tolist() for step in global_batches(
        len(train), 0, 1, 4, train["length"], train["label"])[:5]]


def test_bad_dataset_dirs_are_data_errors(tmp_path, prepared_v2):
    with pytest.raises(DataError, match="not a prepared dataset"):
        Prepared.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        Prepared.load(tmp_path)
    manifest = json.loads((prepared_v2 / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="test is missing"):
        Prepared.load(tmp_path).split("test")


def test_tokenizer_fingerprint_mismatch_names_both(prepared_v2):
    prepared = Prepared.load(prepared_v2)
    tok = load_tokenizer(None)
    check_tokenizer(prepared.manifest, tok)  # the dataset's own tokenizer passes
    other = copy.deepcopy(tok)
    other.add_tokens(["<flow>"])
    from cic_gpt2.tokenizer import tokenizer_fingerprint

    with pytest.raises(DataError) as e:
        check_tokenizer(prepared.manifest, other)
    assert prepared.manifest["tokenizer"]["fingerprint"] in str(e.value)
    assert tokenizer_fingerprint(other) in str(e.value)
