"""Token ids -> class scores: the one scoring path of train's validation, `cic-gpt2 evaluate` and `predict`.

Rows are sorted by token length and cut into batches once, identically on every rank; rank r scores the
r-th contiguous slice of those batches, and the per-row scores are gathered (`gather_rows`), so a row sits
in the same batch whatever the world size and 1 or N processes give the same numbers (docs/evaluation.md)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from cic_gpt2.errors import CicError, DataError


def resolve_device(name: str):
    """`auto` | `cpu` | `cuda` -> a torch.device (auto: cuda when available); a clear error without CUDA."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise CicError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pad_id_of(tokenizer) -> int:
    """Training pads with eos (right padding); seqcls reads the last non-pad token, which this keeps intact."""
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an eos token; GPT-2 tokenizers pad with eos")
    return int(pad)


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------
def row_lengths(input_ids) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_value_length(input_ids).to_numpy(zero_copy_only=False).astype(np.int64)


ROUND_BATCHES = 8  # batches per rank between two gathers (and preemption checks)


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Row indices grouped into batches of similar length (stable sort: the same rows give the same batches)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def rank_stride(batches: list, rank: int, world_size: int) -> list:
    """This rank's batches: every world_size-th of the length-sorted list, so every rank gets short and long
    rows alike (a contiguous slice gave one rank all the long rows: with class-grouped input, one class's)."""
    return batches[rank::world_size]


def pad_batch(rows, pad_id: int, max_tokens: int | None = None, multiple_of: int = 8, max_width: int | None = None):
    """Token-id rows (pyarrow list array) -> right-padded int64 ids [b, L] and attention mask [b, L].

    Each row is cut to its first `max_tokens`; L = the longest row rounded up to `multiple_of`, but never
    rounded past `max_width` (data.max_length in training, the model's context in scoring)."""
    if isinstance(rows, pa.ChunkedArray):
        rows = rows.combine_chunks()
    offsets = rows.offsets.to_numpy()
    values = rows.values.to_numpy(zero_copy_only=False)
    starts, lengths = offsets[:-1], np.diff(offsets)
    if max_tokens is not None:
        lengths = np.minimum(lengths, max_tokens)
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise DataError(f"batch row {int(empty[0])} has no tokens; prepare the dataset again")
    width = max(1, int(lengths.max(initial=1)))
    width = max(width, min(-(-width // multiple_of) * multiple_of, max_width or np.iinfo(np.int64).max))
    positions = np.arange(width)
    mask = positions[None, :] < lengths[:, None]
    ids = np.full((len(lengths), width), pad_id, dtype=np.int64)
    ids[mask] = values[(starts[:, None] + positions[None, :])[mask]]
    return ids, mask.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------
def score_batches(model, input_ids, batches: list[np.ndarray], device, pad_id: int, max_tokens: int | None = None,
                  max_width: int | None = None, multiple_of: int = 8, progress=None) -> np.ndarray:
    """Class scores (float32 [sum of batch sizes, num_labels]) of the rows of `batches`, in that order.
    `model`: a TrafficClassifier or the DeepSpeed engine wrapping one (put in eval mode by the caller)."""
    import torch

    scores = []
    with torch.no_grad():  # not inference_mode: the DeepSpeed engine's module is trained again after validation
        for index in batches:
            ids, mask = pad_batch(input_ids.take(pa.array(index)), pad_id, max_tokens, multiple_of, max_width)
            out = model(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device))
            scores.append(out.logits.float().cpu().numpy())
            if progress is not None:
                progress.update(len(index))
    if not scores:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(scores)


def score_rows(model, input_ids, batch_size: int, device, pad_id: int, max_tokens: int | None = None,
               max_width: int | None = None, progress=None) -> np.ndarray:
    """Class scores of every row of `input_ids`, in row order (one process; batched by length)."""
    batches = length_sorted_batches(np.minimum(row_lengths(input_ids), max_tokens or np.iinfo(np.int64).max),
                                    batch_size)
    sorted_scores = score_batches(model, input_ids, batches, device, pad_id, max_tokens, max_width, progress=progress)
    scores = np.empty_like(sorted_scores)
    if len(batches):
        scores[np.concatenate(batches)] = sorted_scores
    return scores


def gather_rows(local: np.ndarray, world_size: int, device) -> np.ndarray:
    """All ranks' [index, values...] rows. Each rank's block is padded to the longest with index -1 rows,
    which are dropped; the result is sorted by index. Collective: every rank calls it (no-op on one)."""
    import torch
    import torch.distributed as tdist

    if world_size > 1 and tdist.is_initialized():
        count = torch.tensor([len(local)], dtype=torch.int64, device=device)
        tdist.all_reduce(count, op=tdist.ReduceOp.MAX)
        padded = np.full((int(count.item()), local.shape[1]), -1.0, dtype=np.float64)
        padded[:len(local)] = local
        mine = torch.from_numpy(padded).to(device)  # on the backend's device (nccl gathers GPU tensors only)
        blocks = [torch.empty_like(mine) for _ in range(world_size)]
        tdist.all_gather(blocks, mine)
        local = torch.cat(blocks).cpu().numpy()
    local = local[local[:, 0] >= 0]
    return local[np.argsort(local[:, 0], kind="stable")]


def score_distributed(model, input_ids, num_labels: int, batch_size: int, device, pad_id: int,
                      max_tokens: int | None, context: int, rank: int, world_size: int, comm_device,
                      multiple_of: int = 8, progress=None, row_ids=None, stop=None,
                      round_batches: int = ROUND_BATCHES) -> np.ndarray:
    """Class scores [n, num_labels] (float64) of every row of `input_ids`, in row order, on every rank.
    Collective. `context`: most tokens a row may have (after `max_tokens`); longer rows are a DataError
    naming the first (by `row_ids` when given). Ranks take strided batches and gather every `round_batches`
    batches (a bounded gather, not every logit of the split at once); before each round `stop()` (a
    collective, e.g. the preemption watcher's `agreed`) may end it with `EvaluationInterrupted`."""
    from cic_gpt2.preempt import EvaluationInterrupted

    lengths = row_lengths(input_ids)
    if max_tokens:
        lengths = np.minimum(lengths, max_tokens)
    too_long = np.flatnonzero(lengths > context)
    if too_long.size:
        first = int(row_ids[too_long[0]]) if row_ids is not None else int(too_long[0])
        raise DataError(f"row id {first} has {int(lengths[too_long[0]])} tokens, more than the model's context of "
                        f"{context} ({too_long.size} rows in all); train with data.max_length")
    batches = length_sorted_batches(lengths, batch_size)
    mine = rank_stride(batches, rank, world_size)
    if progress is not None:
        progress.reset(total=sum(len(b) for b in mine))  # this rank's rows
    rounds = -(-len(batches) // (world_size * round_batches))  # the same on every rank
    blocks = []
    for r in range(rounds):
        if stop is not None and stop():
            raise EvaluationInterrupted(f"stopped after {r} of {rounds} scoring rounds")
        chunk = mine[r * round_batches:(r + 1) * round_batches]
        index = np.concatenate(chunk) if chunk else np.zeros(0, dtype=np.int64)
        local = np.zeros((len(index), 1 + num_labels), dtype=np.float64)
        local[:, 0] = index
        if len(index):
            local[:, 1:] = score_batches(model, input_ids, chunk, device, pad_id, max_tokens, context, multiple_of,
                                         progress)
        blocks.append(gather_rows(local, world_size, comm_device))
    gathered = np.concatenate(blocks) if blocks else np.zeros((0, 1 + num_labels))
    gathered = gathered[np.argsort(gathered[:, 0], kind="stable")]
    if not np.array_equal(gathered[:, 0].astype(np.int64), np.arange(len(lengths))):
        raise CicError(f"scoring gathered {len(gathered)} rows for {len(lengths)}: batch partition bug")
    return gathered[:, 1:]


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores.astype(np.float64) - scores.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def metrics_from_scores(scores: np.ndarray, labels: np.ndarray, row_ids: np.ndarray, label_names: list[str],
                        split: str) -> dict:
    """classification_metrics of the arg-max, plus the row-normalized confusion matrix, the mean
    cross-entropy (`loss`), the split name and the scored rows' id digest."""
    from cic_gpt2.metrics import classification_metrics, normalize_rows, row_ids_digest

    probs = softmax(scores)
    y_pred = probs.argmax(axis=1)
    metrics = classification_metrics(labels, y_pred, label_names, probs=probs)
    metrics["confusion_matrix_normalized"] = normalize_rows(metrics["confusion_matrix"]).round(6).tolist()
    metrics["loss"] = float(-np.mean(np.log(np.maximum(probs[np.arange(len(y_pred)), labels], 1e-300))))
    metrics["split"] = split
    metrics["row_ids_sha256"] = row_ids_digest(row_ids)
    return metrics
