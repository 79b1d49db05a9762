"""The bundled GPT-2 tokenizer, its fingerprint, offline errors, and the exact word-cache encoder."""
import numpy as np
import pandas as pd
import pytest

from cic_gpt2 import schema
from cic_gpt2.errors import CicError
from cic_gpt2.templates import TEMPLATES, render
from cic_gpt2.tokenizer import WordEncoder, load_tokenizer, tokenizer_fingerprint


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_bundled_tokenizer_is_gpt2(tok):
    assert len(tok) == 50257
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.eos_token_id == 50256
    assert tok.decode([15496, 995]) == "Hello world"


def test_fingerprint_follows_vocab_not_location(tok, tmp_path):
    fp = tokenizer_fingerprint(tok)
    tok.save_pretrained(tmp_path / "tok")
    from_dir = load_tokenizer(str(tmp_path / "tok"))
    assert from_dir("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer_fingerprint(from_dir) == fp
    from_dir.add_tokens(["<flow>"])
    assert tokenizer_fingerprint(from_dir) != fp


def test_model_name_not_cached_is_a_clear_offline_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(CicError, match="login node") as e:
        load_tokenizer("gpt2-large")
    assert "hf download gpt2-large" in str(e.value) and "\n" not in str(e.value)


def test_missing_dir_and_file_paths_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CicError, match="no usable tokenizer files"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(CicError, match="not a directory"):
        load_tokenizer(str(tmp_path / "nope" / "x"))


def _check_exact(encoder, tok, texts):
    flat, offsets = encoder.encode(texts)
    expected = tok(list(texts), add_special_tokens=False)["input_ids"]
    assert len(offsets) == len(texts) + 1
    for i, ids in enumerate(expected):
        assert flat[offsets[i]:offsets[i + 1]].tolist() == ids, texts[i]
    return expected


@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_word_cache_equals_whole_text_tokenization_on_real_rows(tok, fmt, sample_v1, sample_v2):
    features = schema.FEATURES_BY_FORMAT[fmt]
    values = pd.read_csv(sample_v1 if fmt == "v1" else sample_v2)[list(features)].to_numpy(np.float64)
    encoder = WordEncoder(tok)
    for template in TEMPLATES:
        _check_exact(encoder, tok, render(template, values[:1000], features).to_pylist())
    assert encoder.cache  # second pass is served from the cache and still exact
    _check_exact(encoder, tok, render("compact", values[:1000], features).to_pylist())


def test_word_cache_exact_on_awkward_text(tok):
    texts = ["a b  c", " lead", "trail ", "x\ty z", "line\nbreak", "<|endoftext|> q", "", "it's 12.5 ok",
             "a\u00a0 b", "é ü 你好 x", "   ", "flow_duration:1234 src_port:80 dst_port:443 protocol:TCP..."]
    expected = _check_exact(WordEncoder(tok), tok, texts)
    assert expected[texts.index("")] == [] and all(expected[i] for i, t in enumerate(texts) if t)


def test_word_cache_is_bounded(tok):
    encoder = WordEncoder(tok, max_cache_words=50)
    texts = [" ".join(f"w{i}x{j}" for j in range(30)) for i in range(10)]
    _check_exact(encoder, tok, texts)
    assert len(encoder.cache) <= 300 + 50
    _check_exact(encoder, tok, texts[:1])
    assert len(encoder.cache) <= 50
