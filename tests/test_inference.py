"""inference.py: one padder, length-sorted batches strided over ranks, gathering in rounds, scoring, metrics."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from cic_gpt2.config import ModelConfig
from cic_gpt2.data import collate
from cic_gpt2.errors import DataError
from cic_gpt2.inference import (
    gather_rows, length_sorted_batches, metrics_from_scores, pad_batch, pad_id_of, rank_stride, score_distributed,
    score_rows,
)
from cic_gpt2.model import build_model
from cic_gpt2.prepared import Prepared
from cic_gpt2.tokenizer import load_tokenizer


@pytest.mark.parametrize("n", [0, 1, 5, 7, 10, 11])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_strides_cover_every_row_once_in_the_same_batches(n, world):
    lengths = np.random.default_rng(n).integers(1, 40, n)
    batches = length_sorted_batches(lengths, 3)
    strides = [rank_stride(batches, r, world) for r in range(world)]
    assert sorted(b.tolist() for s in strides for b in s) == sorted(b.tolist() for b in batches)
    rows = np.concatenate([b for s in strides for b in s]) if n else np.zeros(0)
    assert sorted(rows.tolist()) == list(range(n))
    for s in strides:  # batches of similar length: each rank's batches in length order
        mine = np.concatenate(s).astype(int) if s else np.zeros(0, dtype=int)
        assert (np.diff(lengths[mine]) >= 0).all()


def test_class_grouped_rows_give_every_rank_the_same_work():
    """prepare keeps input-file order and classes differ in length (a flood row is shorter than a web-attack
    row): a contiguous slice of the length-sorted batches gave the last rank all the long rows. Strided, every
    rank's token count is within one batch of the others'."""
    lengths = np.concatenate([np.full(1000, 20), np.full(1000, 60)])  # two classes, one after the other
    batches = length_sorted_batches(lengths, 16)
    tokens = [sum(int(lengths[b].sum()) for b in rank_stride(batches, r, 4)) for r in range(4)]
    assert max(tokens) - min(tokens) <= 16 * 60, tokens
    contiguous = [sum(int(lengths[b].sum()) for b in batches[len(batches) * r // 4:len(batches) * (r + 1) // 4])
                  for r in range(4)]
    assert max(contiguous) > 2.5 * min(contiguous), contiguous  # what it was


def test_pad_batch_rounds_up_caps_and_truncates():
    rows = pa.array([[5, 6, 7], [1] * 10], type=pa.list_(pa.int64()))
    ids, mask = pad_batch(rows, 50256)
    assert ids.shape == (2, 16) and ids[0].tolist() == [5, 6, 7] + [50256] * 13 and mask.sum(1).tolist() == [3, 10]
    ids, mask = pad_batch(rows, 0, max_width=12)  # rounding stops at the cap (the model's context)
    assert ids.shape == (2, 12)
    ids, mask = pad_batch(rows, 0, max_tokens=4, max_width=4)
    assert ids.shape == (2, 4) and ids[1].tolist() == [1] * 4
    with pytest.raises(DataError, match="no tokens"):
        pad_batch(pa.array([[1], []], type=pa.list_(pa.int64())), 0)


def test_training_collate_is_the_same_padder():
    rows = [[1] * 30, [2] * 5, [3] * 17]
    for max_length in (None, 12, 40):
        batch = collate(rows, [0, 1, 0], [0, 1, 2], pad_token_id=9, max_length=max_length)
        ids, mask = pad_batch(pa.array(rows), 9, max_length, 8, max_width=max_length)
        assert batch["input_ids"].tolist() == ids.tolist() and batch["attention_mask"].tolist() == mask.tolist()


def test_gather_on_one_process_drops_padding_rows_and_sorts():
    local = np.array([[2, 0.2], [-1, 9.0], [0, 0.0], [1, 0.1]])
    assert gather_rows(local, 1, "cpu").tolist() == [[0, 0.0], [1, 0.1], [2, 0.2]]


def test_scoring_is_independent_of_batching_and_metrics_match_the_scores(prepared_v2):
    prepared = Prepared.load(prepared_v2)
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny", dropout=0.0), prepared.label_names, tok).eval()
    table = prepared.table("val")
    ids = table.column("input_ids")
    one = score_distributed(model, ids, len(prepared.label_names), 16, "cpu", pad_id_of(tok), None,
                            model.max_row_tokens, 0, 1, "cpu")
    rows = score_rows(model, ids, 16, "cpu", pad_id_of(tok))
    np.testing.assert_allclose(one, rows, rtol=0, atol=1e-6)
    small = score_rows(model, ids, 5, "cpu", pad_id_of(tok))  # other batches, other padding widths
    np.testing.assert_allclose(small, rows, rtol=1e-4, atol=1e-5)
    labels = table.column("label").to_numpy()
    metrics = metrics_from_scores(one, labels, table.column("row_id").to_numpy(), prepared.label_names, "val")
    assert metrics["n"] == len(labels) and metrics["accuracy"] == pytest.approx((one.argmax(1) == labels).mean())
    with pytest.raises(DataError, match="more than the model's context of 4"):
        score_distributed(model, ids, len(prepared.label_names), 16, "cpu", pad_id_of(tok), None, 4, 0, 1, "cpu",
                          row_ids=table.column("row_id").to_numpy())


def test_scoring_in_rounds_equals_one_round_and_stops_between_rounds(prepared_v2):
    """Gathering every round (round_batches=1) gives the same scores as one big round; `stop` is asked before
    each round and ends scoring with EvaluationInterrupted (the trainer then saves and exits 75)."""
    from cic_gpt2.preempt import EvaluationInterrupted

    prepared = Prepared.load(prepared_v2)
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny", dropout=0.0), prepared.label_names, tok).eval()
    ids = prepared.table("val").column("input_ids")
    args = (model, ids, len(prepared.label_names), 16, "cpu", pad_id_of(tok), None, model.max_row_tokens, 0, 1, "cpu")
    whole = score_distributed(*args, round_batches=10_000)
    asked = []
    rounds = score_distributed(*args, round_batches=1, stop=lambda: asked.append(1) and False)
    np.testing.assert_allclose(rounds, whole, rtol=0, atol=1e-6)
    assert len(asked) == -(-ids.length() // 16)  # one question per round
    asked.clear()
    with pytest.raises(EvaluationInterrupted, match="after 3 of"):  # the 4th question says stop
        score_distributed(*args, round_batches=1, stop=lambda: asked.append(1) or len(asked) == 4)
