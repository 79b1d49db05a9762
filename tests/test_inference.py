"""inference.py: one padder, length-sorted batches sliced over ranks, gathering, scoring, metrics."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from cic_gpt2.config import ModelConfig
from cic_gpt2.data import collate
from cic_gpt2.errors import DataError
from cic_gpt2.inference import (
    gather_rows, length_sorted_batches, metrics_from_scores, pad_batch, pad_id_of, rank_slice, score_distributed,
    score_rows,
)
from cic_gpt2.model import build_model
from cic_gpt2.prepared import Prepared
from cic_gpt2.tokenizer import load_tokenizer


@pytest.mark.parametrize("n", [0, 1, 5, 7, 10, 11])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_slices_cover_every_row_once_in_the_same_batches(n, world):
    lengths = np.random.default_rng(n).integers(1, 40, n)
    batches = length_sorted_batches(lengths, 3)
    slices = [rank_slice(batches, r, world) for r in range(world)]
    assert [b.tolist() for s in slices for b in s] == [b.tolist() for b in batches]  # rank order = batch order
    rows = np.concatenate([b for s in slices for b in s]) if n else np.zeros(0)
    assert sorted(rows.tolist()) == list(range(n))
    assert (np.diff(lengths[rows.astype(int)]) >= 0).all()  # batches of similar length: sorted by length


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
