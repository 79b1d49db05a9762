"""Config precedence (defaults < file < CLI overrides) and errors that name the key."""
import dataclasses
import json

import pytest

from cic_gpt2.config import RunConfig, load_config, parse_overrides, save_config
from cic_gpt2.errors import ConfigError


def test_defaults_then_file_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  lr: 1.0e-4\n  micro_batch_size: 4\nmodel:\n  name: small\n")
    cfg = load_config(RunConfig, f, ["train.lr=3e-5", "log.run_dir=/tmp/x"])
    assert cfg.train.lr == pytest.approx(3e-5)  # override beats file
    assert cfg.train.micro_batch_size == 4  # file beats default
    assert cfg.model.name == "small"
    assert cfg.log.run_dir == "/tmp/x"
    assert cfg.train.grad_accum == RunConfig().train.grad_accum  # default kept


def test_json_file(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"train": {"epochs": 2}}))
    assert load_config(RunConfig, f).train.epochs == 2.0


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.lrr=1"], r"unknown config key train\.lrr"),
        (["trian.lr=1"], r"unknown config key trian"),
        (["train.micro_batch_size=abc"], r"train\.micro_batch_size must be an integer"),
        (["train.micro_batch_size=0"], r"train\.micro_batch_size=0 must be >= 1"),
        (["train.precision=fp8"], r"train\.precision='fp8' is not one of"),
        (["model.gradient_checkpointing=maybe"], r"model\.gradient_checkpointing must be true or false"),
        (["train.lr=1", "train.lr=2"], r"override train\.lr given twice"),
        (["train.lr"], r"must look like section\.key=value"),
    ],
)
def test_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RunConfig, None, overrides)


def test_duplicate_yaml_key_is_an_error(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("train:\n  lr: 1.0\n  lr: 2.0\n")
    with pytest.raises(ConfigError, match=r"duplicated key 'lr'"):
        load_config(RunConfig, f)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(RunConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RunConfig, bad)


def test_frozen_and_round_trip(tmp_path):
    cfg = load_config(RunConfig, None, ["train.seed=7", "data.max_length=128"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.seed = 8  # type: ignore[misc]
    variant = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=8))
    assert (cfg.train.seed, variant.train.seed) == (7, 8)
    path = tmp_path / "resolved.yaml"
    save_config(cfg, path)
    assert load_config(RunConfig, path) == cfg


def test_parse_overrides_types():
    assert parse_overrides(["a.b=1", "a.c=true", "d=x"]) == {"a": {"b": 1, "c": True}, "d": "x"}
