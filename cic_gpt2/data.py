"""Prepared splits -> training batches: the global-batch sampling contract, class balancing and the collate.

The contract (the examples of optimizer step k depend on (seed, epoch, global batch) only, never on how the
global batch is split over micro-batches, accumulation and ranks): docs/model.md, "Batches". The class-balanced
draw (`data.sampler=balanced`) and the loss weights (`train.class_weights`) keep it. Rows hold GPT-2 ids
already (`cic-gpt2 prepare`); evaluation batches are formed by `inference`."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from cic_gpt2.inference import pad_batch, pad_id_of

GROUP_CHUNK_BATCHES = 64
"""Length grouping sorts chunks of this many global batches: big enough to find similar lengths, small
enough that batches still mix the whole epoch after the shuffle."""


# --------------------------------------------------------------------------------------------------
# Sampling (pure index arithmetic; tested against the contract above)
# --------------------------------------------------------------------------------------------------
def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def balanced_draw(labels: Sequence[int], seed: int, epoch: int, size: int) -> np.ndarray:
    """`size` row indices, each drawn by picking a class uniformly among those in `labels`, then one of its
    rows uniformly (with replacement). Slot j reads only doubles 2j and 2j+1 of the (seed, epoch) stream, so
    a longer draw extends a shorter one."""
    labels = np.asarray(labels)
    by_class = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[by_class], return_index=True, return_counts=True)
    u = np.random.default_rng([int(seed), int(epoch), 2]).random((size, 2))
    cls = np.minimum((u[:, 0] * len(counts)).astype(np.int64), len(counts) - 1)  # min: u * k may round up to k
    within = np.minimum((u[:, 1] * counts[cls]).astype(np.int64), counts[cls] - 1)
    return by_class[starts[cls] + within]


def global_batches(
    n: int, seed: int, epoch: int, global_batch_size: int, lengths: Optional[Sequence[int]] = None,
    labels: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """[steps_per_epoch, G] row indices of every optimizer step of `epoch`: a permutation of the n rows, or
    with `labels` a class-balanced draw (`balanced_draw`) of as many steps. `lengths` given: length-grouped."""
    steps = n // global_batch_size
    if labels is None:
        perm = epoch_permutation(n, seed, epoch)[: steps * global_batch_size]
    else:
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} rows")
        perm = balanced_draw(labels, seed, epoch, steps * global_batch_size)
    if lengths is None or steps == 0:
        return perm.reshape(steps, global_batch_size)
    lengths = np.asarray(lengths)
    chunk = GROUP_CHUNK_BATCHES * global_batch_size
    parts = []
    for start in range(0, len(perm), chunk):
        part = perm[start:start + chunk]
        parts.append(part[np.argsort(-lengths[part], kind="stable")])
    batches = np.concatenate(parts).reshape(steps, global_batch_size)
    order = np.random.default_rng([int(seed), int(epoch), 1]).permutation(steps)
    longest = int(np.argmax(lengths[batches].max(axis=1)))
    order = np.concatenate([[longest], order[order != longest]])  # the longest batch first: an OOM shows at once
    return batches[order]


def stratified_subset(labels: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Sorted positions of at most `max_rows` rows with the class proportions of `labels` (every class
    present keeps at least one row), drawn once from (seed) alone: the same rows at every validation."""
    labels = np.asarray(labels)
    if not max_rows or max_rows >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng([int(seed), 3])
    picked = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        take = max(1, int(round(len(rows) * max_rows / len(labels))))
        picked.append(rng.choice(rows, size=min(take, len(rows)), replace=False))
    return np.sort(np.concatenate(picked))


def class_weights(counts: Sequence[int], mode: str, sampler: str = "shuffle") -> Optional[np.ndarray]:
    """Loss weight of each class (`train.class_weights`) from its training rows `counts`; None for `none`.

    w_c = n_c^-p (p = 1 `balanced`, 1/2 `sqrt`; 0 for a class with no rows), scaled so that a training
    example's expected weight is 1 under `sampler`: sum_c q_c w_c = 1 with q_c = n_c / n (`shuffle`) or 1 / C
    (`balanced`; C classes with rows). `balanced` + `shuffle` is scikit-learn's n / (C n_c). The model's loss
    is mean(w_label * loss) over each micro-batch, so no per-batch normaliser breaks the global-batch contract."""
    if mode == "none":
        return None
    power = {"balanced": 1.0, "sqrt": 0.5}[mode]
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("class weights need at least one class with training rows")
    weights = np.zeros_like(counts)
    weights[present] = counts[present] ** -power
    q = counts / counts.sum() if sampler == "shuffle" else present / present.sum()
    return weights / float(q @ weights)


def rank_micro_batches(global_batch: np.ndarray, rank: int, world_size: int, grad_accum: int) -> list[np.ndarray]:
    """This rank's contiguous slice of a global batch, cut into grad_accum equal micro-batches."""
    per_rank = len(global_batch) // world_size
    mine = global_batch[rank * per_rank:(rank + 1) * per_rank]
    return np.split(mine, grad_accum)


# --------------------------------------------------------------------------------------------------
# Collate
# --------------------------------------------------------------------------------------------------
def collate(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[int],
    index: Sequence[int],
    pad_token_id: int,
    max_length: Optional[int] = None,
    pad_to_multiple_of: int = 8,
) -> dict[str, torch.Tensor]:
    """Token-id rows -> a training batch: right-padded (with `pad_token_id`, GPT-2's eos) by
    `inference.pad_batch`, rows truncated to `max_length`. Returns input_ids, attention_mask [B, T] int64,
    labels, index [B]."""
    rows = input_ids if isinstance(input_ids, (pa.Array, pa.ChunkedArray)) else pa.array(
        [list(r) for r in input_ids], type=pa.list_(pa.int64()))
    ids, mask = pad_batch(rows, pad_token_id, max_length, pad_to_multiple_of, max_width=max_length)
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64)),
        "index": torch.as_tensor(np.asarray(index, dtype=np.int64)),
    }


def read_batch(dataset, rows: np.ndarray, tokenizer, data_cfg) -> dict[str, torch.Tensor]:
    """The `collate` batch of the split's rows at positions `rows` (one memory-mapped Arrow read)."""
    table = dataset.with_format("arrow")[np.asarray(rows, dtype=np.int64).tolist()]
    return collate(table.column("input_ids"), table.column("label").to_numpy(), rows, pad_id_of(tokenizer),
                   data_cfg.max_length, data_cfg.pad_to_multiple_of)


# --------------------------------------------------------------------------------------------------
# The training iterator
# --------------------------------------------------------------------------------------------------
def train_batches(
    dataset,
    *,
    epoch: int,
    start_step: int,
    seed: int,
    micro_batch_size: int,
    grad_accum: int,
    rank: int,
    world_size: int,
    tokenizer,
    data_cfg,
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """One item per optimizer step of `epoch`, from step `start_step` (resume): this rank's grad_accum
    micro-batches, each a `collate` dict. Global batch contract in the module docstring."""
    global_batch_size = micro_batch_size * grad_accum * world_size
    columns = dataset.with_format("numpy")
    lengths = columns["length"] if data_cfg.group_by_length else None
    labels = columns["label"] if data_cfg.sampler == "balanced" else None
    batches = global_batches(len(dataset), seed, epoch, global_batch_size, lengths, labels)
    for step in range(start_step, len(batches)):
        micro = rank_micro_batches(batches[step], rank, world_size, grad_accum)
        yield [read_batch(dataset, rows, tokenizer, data_cfg) for rows in micro]
