"""Config precedence (defaults < file < CLI overrides), errors that name the key, and generated key docs."""
import argparse
import dataclasses
import json
from typing import Optional

import pytest

from cic_gpt2.config import RunConfig, load_config, parse_overrides, save_config, to_dict
from cic_gpt2.config_doc import config_help, config_keys
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
        (["train.class_weights=inverse"], r"train\.class_weights='inverse' is not one of"),
        (["data.sampler=uniform"], r"data\.sampler='uniform' is not one of"),
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


def test_shipped_recipe_by_name(tmp_path, monkeypatch):
    from cic_gpt2.config import recipe_path

    cfg = load_config(RunConfig, "cpu_tiny", ["train.epochs=2"])
    assert recipe_path("cpu_tiny").name == "cpu_tiny.yaml"
    assert cfg.model.name == "tiny" and cfg.train.weight_decay == 0.1 and cfg.train.epochs == 2
    with pytest.raises(ConfigError, match="not a shipped recipe: cpu_tiny"):
        load_config(RunConfig, "cpu_huge")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cpu_tiny").write_text("train:\n  epochs: 9\n")  # a file of that name wins over the recipe
    assert load_config(RunConfig, "cpu_tiny").train.epochs == 9


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


def _leaf_keys(d: dict, prefix: str = "") -> list[str]:
    return [k for name, v in d.items() for k in (_leaf_keys(v, f"{prefix}{name}.") if isinstance(v, dict) else [prefix + name])]


def test_every_key_is_documented_in_help():
    keys = config_keys()
    assert [k.key for k in keys] == _leaf_keys(to_dict(RunConfig()))  # nothing missed, declaration order
    assert {"train.lr", "checkpoint.every_steps", "data.max_length", "dist.timeout_s"} <= {k.key for k in keys}
    undocumented = [k.key for k in keys if not k.doc.strip()]
    assert not undocumented, f"add a docstring under these fields in cic_gpt2/config.py: {undocumented}"
    text = config_help()
    for k in keys:
        assert k.type and k.default
        assert f"\n  {k.key} ({k.type}, default {k.default})\n      {k.doc.split()[0]}" in text
    for section in ("model", "data", "train", "log", "checkpoint", "dist"):
        assert f"\n\n{section}: " in text
    assert max(map(len, text.splitlines())) <= 100


def test_help_shows_types_and_defaults_as_written():
    by_key = {k.key: k for k in config_keys()}
    assert (by_key["train.lr"].type, by_key["train.lr"].default) == ("float", repr(RunConfig().train.lr))
    assert (by_key["data.max_length"].type, by_key["data.max_length"].default) == ("Optional[int]", "null")
    assert by_key["model.head"].type == 'Literal["seqcls", "causal-lm"]'
    assert (by_key["data.path"].default, by_key["log.tensorboard"].default) == ('""', "true")


def test_shown_defaults_parse_back_to_the_defaults():
    overrides = [f"{k.key}={k.default}" for k in config_keys()]
    for item in overrides:
        assert load_config(RunConfig, None, [item]) == RunConfig(), item
    assert load_config(RunConfig, None, overrides) == RunConfig()


def test_help_survives_raw_description_formatter():
    parser = argparse.ArgumentParser(prog="cic-gpt2 train", epilog=config_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    assert config_help() in parser.format_help()


@dataclasses.dataclass(frozen=True)
class _Inner:
    xs: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    """A list from a default_factory."""
    name: str = "1.0"
    undocumented: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    """The inner section."""
    top: bool = False
    """A key outside any section."""


def test_keys_of_any_nested_dataclass():
    keys = {k.key: k for k in config_keys(_Outer)}
    assert list(keys) == ["top", "inner.xs", "inner.name", "inner.undocumented"]
    assert (keys["inner.xs"].type, keys["inner.xs"].default) == ("list[int]", "[1, 2]")
    assert keys["inner.name"].default == '"1.0"'  # quoted: bare 1.0 would read back as a float
    assert keys["inner.undocumented"].doc == ""  # what makes test_every_key_is_documented_in_help fail
    assert load_config(_Outer, None, [f"{k.key}={k.default}" for k in keys.values()]) == _Outer()
    assert "\n\ninner: The inner section.\n  inner.xs (list[int], default [1, 2])\n" in config_help(_Outer)
