"""The binned template: edges fitted on the training split only, one word per feature, its own word-level
tokenizer saved with the export (AutoTokenizer + pipeline work), the same bins applied to raw CSVs."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SAMPLE_V2, run_cli
from test_train import torchrun

from cic_gpt2 import binning
from cic_gpt2.prepared import Prepared
from cic_gpt2.tokenizer import WordEncoder


def test_fit_and_render_follow_the_documented_bin_rule():
    values = np.array([[0, 5, 1.5], [0, 0, 1.5], [1, 0, 1.5], [2, 0, 1.5], [3, 0, 1.5],
                       [4, 0, 1.5], [5, 0, 1.5], [6, 0, 1.5]], dtype=np.float32)
    b = binning.fit(values, ["a", "b", "c"], bins=4)
    by = {f["name"]: f["edges"] for f in b["features"]}
    # quantiles 1/4, 2/4, 3/4 of [0 0 1 2 3 4 5 6] (method lower: sorted[floor(q*7)]) -> 0, 2, 4; 0 is the
    # minimum, so no bin below it
    assert by["a"] == [2.0, 4.0]
    assert by["b"] == [5.0]  # 7 of 8 rows at the minimum: one cut above it, no empty bottom bin
    assert by["c"] == []  # constant on the training rows: left out of the text
    texts = binning.render(np.array([[1, 0, 9], [2, 5, 9], [3.5, 7, 9], [99, -1, 9]]), ["a", "b", "c"], b)
    # a value equal to an edge is in the upper bin; below the first edge is bin 0; above the last, the top bin
    assert texts.to_pylist() == ["a_0 b_0", "a_1 b_1", "a_1 b_1", "a_2 b_0"]
    assert binning.words(b) == ["<|endoftext|>", "[UNK]", "a_0", "a_1", "a_2", "b_0", "b_1"]
    assert b["fitted_on"] == {"split": "train", "rows": 8, "sampled_from": 8}
    with pytest.raises(Exception, match="no feature 'z'"):
        binning.render(np.zeros((1, 1)), ["z"], b)


def test_tokenizer_ids_are_the_word_indices_and_prepare_encoder_agrees():
    b = binning.fit(np.arange(40, dtype=np.float32).reshape(20, 2), ["Rate", "Tot size"], bins=8)
    tok = binning.build_tokenizer(b)
    words = binning.words(b)
    assert len(tok) == len(words) and tok.eos_token_id == tok.pad_token_id == 0
    texts = binning.render(np.array([[0, 1], [17, 39], [8, 2]], dtype=np.float32), ["Rate", "Tot size"], b)
    direct = [tok(t, add_special_tokens=False)["input_ids"] for t in texts.to_pylist()]
    assert direct == [[words.index(w) for w in t.split()] for t in texts.to_pylist()]
    flat, offsets = WordEncoder(tok).encode(texts)
    assert [flat[offsets[i]:offsets[i + 1]].tolist() for i in range(3)] == direct
    assert binning.build_tokenizer(json.loads(json.dumps(b))) is tok  # built once per binning


@pytest.fixture(scope="module")
def binned(tmp_path_factory):
    out = tmp_path_factory.mktemp("binned") / "data"
    assert run_cli("prepare", SAMPLE_V2, "--out", out, "--template", "binned", "--classes", "8") == 0
    return Prepared.load(out)


def test_prepare_fits_edges_on_the_training_split_only(binned):
    m = binned.manifest
    names = m["features"]
    train = binned.feature_split("train")
    refit = binning.fit(train.features, names, binning.DEFAULT_BINS)
    assert m["binning"]["features"] == refit["features"]  # independently refitted on the train rows alone
    allrows = np.concatenate([binned.feature_split(s).features for s in ("train", "val", "test")])
    assert binning.fit(allrows, names)["features"] != m["binning"]["features"]  # not on val/test rows
    assert m["binning"]["fitted_on"]["rows"] == m["splits"]["train"]["rows"]
    used = sum(1 for f in m["binning"]["features"] if f["edges"])
    assert 20 <= used < len(names)  # constant-on-train features are left out
    assert m["tokenizer"]["vocab_size"] == len(binning.words(m["binning"]))
    # every row is one word per used feature, and its ids are the rendering of its own features
    tok = binning.build_tokenizer(m["binning"])
    table = binned.table("test")
    ids = table.column("input_ids").to_pylist()
    assert set(table.column("length").to_pylist()) == {used}
    texts = binning.render(binned.feature_split("test").features, names, m["binning"]).to_pylist()
    assert [tok(t, add_special_tokens=False)["input_ids"] for t in texts] == ids


def test_bad_binned_options_fail_with_one_line(tmp_path, capsys):
    assert run_cli("prepare", SAMPLE_V2, "--out", tmp_path / "a", "--bins", "8") != 0
    assert "--bins is for --template binned" in capsys.readouterr().err
    assert run_cli("prepare", SAMPLE_V2, "--out", tmp_path / "b", "--template", "binned", "--tokenizer", "x") != 0
    assert "drop --tokenizer" in capsys.readouterr().err
    assert run_cli("prepare", SAMPLE_V2, "--out", tmp_path / "c", "--template", "binned", "--bins", "1") != 0
    assert "at least 2 bins" in capsys.readouterr().err


def test_binned_data_is_for_seqcls_presets(binned, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from cic_gpt2.config import ModelConfig
    from cic_gpt2.errors import CicError, ConfigError
    from cic_gpt2.model import build_model

    tok = binning.build_tokenizer(binned.manifest["binning"])
    model = build_model(ModelConfig(name="tiny"), binned.label_names, tok)
    assert model.hf_model.config.vocab_size == len(tok) and model.hf_model.config.pad_token_id == 0
    with pytest.raises(ConfigError, match="model.head=seqcls"):
        build_model(ModelConfig(name="tiny", head="causal-lm"), binned.label_names, tok)
    pretrained = tmp_path / "gpt2-dir"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16)).save_pretrained(pretrained)
    with pytest.raises(CicError, match="binned is for from-scratch presets"):
        build_model(ModelConfig(name=str(pretrained)), binned.label_names, tok)


@pytest.mark.slow
def test_binned_model_trains_on_two_ranks_and_its_export_bins_raw_csvs(binned, tmp_path, capsys):
    from transformers import AutoTokenizer, pipeline

    run_dir = tmp_path / "run"
    torchrun(2, "--data", binned.path, "--run-dir", run_dir, "model.name=tiny", "train.max_steps=8",
             "train.micro_batch_size=8", "train.lr=3e-3", "train.warmup_steps=2", "log.progress=false",
             "train.eval_max_rows=64")
    export = run_dir / "export"
    tok = AutoTokenizer.from_pretrained(export)
    assert tok.get_vocab() == binning.build_tokenizer(binned.manifest["binning"]).get_vocab()
    exported = json.loads((export / "data_manifest.json").read_text())
    assert exported["binning"] == binned.manifest["binning"]

    # predict on raw CSV rows (binned with the export's edges) == plain transformers on binning.render_rows
    rows = tmp_path / "rows.csv"
    df = pd.read_csv(SAMPLE_V2, nrows=40)
    df.to_csv(rows, index=False)
    assert run_cli("predict", "--model", run_dir, "--input", rows, "--output", tmp_path / "pred.csv",
                   "--all-probs", "--no-progress") == 0
    pred = pd.read_csv(tmp_path / "pred.csv")
    clf = pipeline("text-classification", model=str(export), tokenizer=str(export), device="cpu")
    with torch.no_grad():
        ranked = clf(binning.render_rows(df, exported["binning"]), top_k=None)
    assert [r[0]["label"] for r in ranked] == pred["predicted_label"].tolist()
    for r, p in zip(ranked, pred["probability"]):
        assert r[0]["score"] == pytest.approx(p, abs=1e-5)

    # the prepared test split evaluates; a dataset binned with other edges is refused, naming why
    assert run_cli("evaluate", "--model", run_dir, "--data", binned.path, "--output", tmp_path / "ev",
                   "--no-progress") == 0
    other = tmp_path / "other"
    assert run_cli("prepare", SAMPLE_V2, "--out", other, "--template", "binned", "--classes", "8",
                   "--bins", "8") == 0
    capsys.readouterr()
    assert run_cli("evaluate", "--model", run_dir, "--data", other, "--output", tmp_path / "ev2",
                   "--no-progress") != 0
    assert "bin edges differ from the model's training data" in capsys.readouterr().err
