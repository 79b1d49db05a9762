"""Prepared splits -> batches: memory-mapped Arrow, the global-batch sampling contract, dynamic padding.

Global-batch contract (what makes micro 4 x accumulation 1 == micro 1 x accumulation 4 == 2 ranks x micro 2):

* epoch e has a permutation P_e of the split, seeded by (seed, e) alone (numpy PCG64, platform independent);
* optimizer step k of the epoch consumes the global batch P_e[k*G:(k+1)*G], G = micro_batch_size * grad_accum
  * world_size; the incomplete last global batch is dropped;
* rank r takes the contiguous slice [r*G/W, (r+1)*G/W) of it and cuts that into grad_accum micro-batches.

So the examples of step k depend on (seed, epoch, G) only, never on how G is split. Every micro-batch has the
same size and its loss is a mean over its examples, so DeepSpeed's average over micro-batches and ranks is the
mean over the global batch. Resume = start the epoch at step k. With `data.group_by_length` the epoch's
complete global batches are re-formed from length-sorted chunks of P_e (GROUP_CHUNK_BATCHES batches each)
and then shuffled: still a function of (seed, epoch, G, lengths), so the invariance holds, with less padding.

Evaluation: rank r scores the contiguous slice [r*ceil(n/W), (r+1)*ceil(n/W)) of the split, padded to that
equal count with copies of a real row whose `index` is -1, so gathered predictions drop them and 1 rank and
2 ranks score the same rows.

Nothing tokenizes here: rows hold GPT-2 ids already (`cic-gpt2 prepare`); the causal-lm head adds its
pre-tokenized prompt and answers in the model.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from cic_gpt2.errors import DataError

GROUP_CHUNK_BATCHES = 64
"""Length grouping sorts chunks of this many global batches: big enough to find similar lengths, small
enough that batches still mix the whole epoch after the shuffle."""


# --------------------------------------------------------------------------------------------------
# Sampling (pure index arithmetic; tested against the contract above)
# --------------------------------------------------------------------------------------------------
def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def global_batches(
    n: int, seed: int, epoch: int, global_batch_size: int, lengths: Optional[Sequence[int]] = None
) -> np.ndarray:
    """[steps_per_epoch, G] row indices of every optimizer step of `epoch`. `lengths` given: length-grouped."""
    steps = n // global_batch_size
    perm = epoch_permutation(n, seed, epoch)[: steps * global_batch_size]
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


def rank_micro_batches(global_batch: np.ndarray, rank: int, world_size: int, grad_accum: int) -> list[np.ndarray]:
    """This rank's contiguous slice of a global batch, cut into grad_accum equal micro-batches."""
    per_rank = len(global_batch) // world_size
    mine = global_batch[rank * per_rank:(rank + 1) * per_rank]
    return np.split(mine, grad_accum)


def eval_indices(n: int, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows to read, index reported) for this rank: a contiguous slice padded to ceil(n/W) rows; padding
    reads a real row (so shapes are ordinary) but reports index -1."""
    per_rank = math.ceil(n / world_size) if n else 0
    start, stop = min(rank * per_rank, n), min((rank + 1) * per_rank, n)
    real = np.arange(start, stop)
    n_pad = per_rank - len(real)
    rows = np.concatenate([real, np.full(n_pad, max(start - 1, 0) if n else 0, dtype=np.int64)])
    index = np.concatenate([real, np.full(n_pad, -1, dtype=np.int64)])
    return rows.astype(np.int64), index


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
    """Right-pad (with `pad_token_id`, GPT-2's eos) to the longest row, rounded up to a multiple; truncate
    rows to `max_length` first. Returns input_ids, attention_mask [B, T] int64, labels, index [B]."""
    rows = [ids[:max_length] if max_length else ids for ids in input_ids]
    longest = max((len(r) for r in rows), default=0)
    width = max(pad_to_multiple_of, math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of)
    if max_length:
        width = min(width, max(max_length, longest))
    ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        if len(r) == 0:
            raise DataError(f"row {index[i]} has no tokens; prepare the dataset again")
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64)),
        "index": torch.as_tensor(np.asarray(index, dtype=np.int64)),
    }


def _read(dataset, rows: np.ndarray) -> tuple[list, list]:
    """Rows by position in one Arrow read (memory-mapped)."""
    table = dataset.select_columns(["input_ids", "label"])[rows.tolist()] if len(rows) else {"input_ids": [], "label": []}
    return table["input_ids"], table["label"]


def _pad_id(tokenizer) -> int:
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an eos token; GPT-2 tokenizers pad with eos")
    return int(pad)


def _batch(dataset, rows: np.ndarray, index: np.ndarray, tokenizer, data_cfg) -> dict[str, torch.Tensor]:
    input_ids, labels = _read(dataset, rows)
    return collate(input_ids, labels, index, _pad_id(tokenizer), data_cfg.max_length, data_cfg.pad_to_multiple_of)


# --------------------------------------------------------------------------------------------------
# Iterators used by train / evaluate
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
    lengths = dataset.with_format("numpy")["length"] if data_cfg.group_by_length else None
    batches = global_batches(len(dataset), seed, epoch, global_batch_size, lengths)
    for step in range(start_step, len(batches)):
        micro = rank_micro_batches(batches[step], rank, world_size, grad_accum)
        yield [_batch(dataset, rows, rows, tokenizer, data_cfg) for rows in micro]


def eval_batches(dataset, batch_size: int, rank: int, world_size: int, tokenizer, data_cfg) -> Iterator[dict]:
    """This rank's evaluation batches (same count and sizes on every rank); padding rows have index -1."""
    rows, index = eval_indices(len(dataset), rank, world_size)
    for start in range(0, len(rows), batch_size):
        yield _batch(dataset, rows[start:start + batch_size], index[start:start + batch_size], tokenizer, data_cfg)
