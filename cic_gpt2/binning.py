"""The `binned` template: every feature written as ONE word, its quantile bin fitted on the training split.

    fit(values, names, bins)       -> the manifest's `binning` dict (edges per feature, JSON-exact floats)
    render(values, names, binning) -> texts such as "dur_3 head_17 pt_2 TTL_5 rate_30 ..."
    build_tokenizer(binning)       -> its word-level tokenizer (`tokenizers` WordLevel in a transformers
                                      PreTrainedTokenizerFast: saved with the export, AutoTokenizer loads it)

A from-scratch GPT-2 reads 39 words of a 1.3k-word vocabulary instead of ~35 BPE pieces of digits whose
magnitude it must learn to parse; pretrained GPT-2 keeps the text templates (its embeddings know digits, not
bin ids). Why and what it gives: docs/prepare.md ("The binned template"), docs/training.md.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cic_gpt2.errors import DataError

TEMPLATE = "binned"
VERSION = 1
DEFAULT_BINS = 32
EOS, UNK = "<|endoftext|>", "[UNK]"
SOURCE = "binned (the manifest's bin edges)"
SAMPLE_ROWS = 1 << 18  # training rows the edges are fitted on (all of them below this; a seeded sample above)


def _keys(names: list[str]) -> list[str]:
    """One short word stem per feature: the compact template's keys, or f<j> where two would collide."""
    from cic_gpt2.templates import COMPACT_KEYS

    keys = [COMPACT_KEYS.get(n, n.replace(" ", "_")) for n in names]
    return keys if len(set(keys)) == len(keys) else [f"f{j}" for j in range(len(names))]


def fit(values: np.ndarray, names: list[str], bins: int = DEFAULT_BINS, sampled_from: int | None = None) -> dict:
    """Quantile edges of each feature over `values` (the training rows, float32-exact).

    Bin b of a feature holds edges[b-1] <= v < edges[b] (bin 0 below edges[0], the last above the last edge),
    so a value equal to an edge is in the upper bin. Edges are the distinct quantiles at k/bins that lie above
    the column's minimum: a column with mass at one value (0 for flags and counts) gets fewer bins, never an
    empty one at the bottom. A feature constant over the training rows has no edges and is left out of the text.
    """
    if bins < 2:
        raise DataError(f"--bins {bins}: need at least 2 bins per feature")
    values = np.asarray(values, dtype=np.float32).astype(np.float64)
    q = np.arange(1, bins) / bins
    features = []
    for j, (name, key) in enumerate(zip(names, _keys(list(names)))):
        col = values[:, j]
        edges: list[float] = []
        if len(col) and col.min() < col.max():
            lo = col.min()
            cut = np.unique(np.quantile(col, q, method="lower"))
            cut = cut[cut > lo]
            if len(cut) == 0:  # more than (bins-1)/bins of the rows at the minimum: one cut above it
                cut = np.array([col[col > lo].min()])
            edges = cut.tolist()
        features.append({"name": name, "key": key, "edges": edges})
    return {"version": VERSION, "bins": bins, "features": features,
            "fitted_on": {"split": "train", "rows": int(len(values)),
                          "sampled_from": int(sampled_from if sampled_from is not None else len(values))}}


def words(binning: dict) -> list[str]:
    """The vocabulary in id order: eos (also the pad), unk, then every bin word of every used feature."""
    out = [EOS, UNK]
    for f in binning["features"]:
        if f["edges"]:
            out += [f"{f['key']}_{b}" for b in range(len(f["edges"]) + 1)]
    return out


def render(values: np.ndarray, names, binning: dict | None) -> pa.StringArray:
    """Texts of n rows (values: (n, len(names)) floats). binning=None renders "" (prepare's first pass,
    before the edges exist: the rows are tokenized once the training split is known)."""
    n = len(values)
    if binning is None:
        return pa.array([""] * n, type=pa.string())
    by_name = {f["name"]: f for f in binning["features"]}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise DataError(f"the bin edges have no feature {missing[0]!r} (binned for {len(by_name)} features); "
                        f"encode these rows with the model's own manifest")
    values = np.asarray(values, dtype=np.float32).astype(np.float64)  # as the edges were fitted
    columns = []
    for j, name in enumerate(names):
        f = by_name[name]
        if not f["edges"]:
            continue
        bins = np.searchsorted(np.asarray(f["edges"], dtype=np.float64), values[:, j], side="right")
        table = pa.array([f"{f['key']}_{b}" for b in range(len(f["edges"]) + 1)], type=pa.string())
        columns.append(table.take(pa.array(bins, type=pa.int32())))
    if not columns:
        return pa.array([""] * n, type=pa.string())
    return columns[0] if len(columns) == 1 else pc.binary_join_element_wise(*columns, " ")


def render_rows(rows, binning: dict) -> list[str]:
    """Texts of rows given as dicts {feature name: value} (or a pandas DataFrame with the feature columns):
    what a plain-transformers user feeds the exported model's pipeline."""
    names = [f["name"] for f in binning["features"]]
    if hasattr(rows, "columns"):
        values = rows[names].to_numpy(dtype=np.float64)
    else:
        values = np.array([[float(r[n]) for n in names] for r in rows], dtype=np.float64).reshape(-1, len(names))
    return render(values, names, binning).to_pylist()


@functools.lru_cache(maxsize=8)
def _tokenizer(binning_json: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words(json.loads(binning_json)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                  unk_token=UNK)
    tok.model_max_length = 1024
    tok.padding_side = "right"
    tok.init_kwargs["name_or_path"] = SOURCE
    return tok


def build_tokenizer(binning: dict):
    """The word-level tokenizer of `binning` (the same object for equal binnings)."""
    return _tokenizer(json.dumps(binning, sort_keys=True))


def sample_train_features(rows_path, split_code: np.ndarray, seed: int, limit: int = SAMPLE_ROWS):
    """(features of up to ~`limit` training rows, training rows in all): every training row when there are
    at most `limit`, else a seeded Bernoulli sample of them, read from prepare's temporary row stream."""
    n_train = int((split_code == 0).sum())
    keep_p = 1.0 if n_train <= limit else limit / n_train
    rng = np.random.default_rng([seed, 0xB1])
    parts, pos = [], 0
    with pa.OSFile(str(rows_path), "rb") as f:
        for batch in pa.ipc.open_stream(f):
            code = split_code[pos:pos + batch.num_rows]
            pos += batch.num_rows
            mask = code == 0
            if keep_p < 1.0:
                mask &= rng.random(len(code)) < keep_p
            if mask.any():
                feats = batch.column(4).filter(pa.array(mask))
                width = len(feats[0]) if len(feats) else 0
                parts.append(feats.flatten().to_numpy().reshape(-1, width))
    return (np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)), n_train
