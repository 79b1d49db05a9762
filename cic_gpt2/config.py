"""Run configuration: one dataclass per concern, nested in `RunConfig`, each field documented under it.

`load_config(RunConfig, path, overrides)` merges defaults < file < CLI dotted overrides; `config_help()` lists
every key (`cic-gpt2 train --help`). Precedence and the errors: docs/training.md.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from cic_gpt2.errors import ConfigError


# ==================== Concerns
@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    """A preset (`tiny`, `small`, `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`: random init from
    config), a local Hugging Face model directory, or a model name already in the local HF cache."""
    pretrained: bool = False
    """For `gpt2*` names: load pretrained weights from a local directory / the local HF cache instead of
    random init. Compute nodes have no internet: download on a login node first."""
    head: Literal["seqcls", "causal-lm"] = "seqcls"
    """`seqcls`: GPT2ForSequenceClassification (last non-pad token). `causal-lm`: instruction prompt +
    answer, loss on the answer tokens only, prediction by scoring each label's tokens."""
    gradient_checkpointing: bool = False
    """Trade compute for activation memory (GPT-2-Large on a 16 GB V100)."""
    dropout: Optional[float] = None
    """Override GPT-2's dropout (embd/attn/resid_pdrop; null: the preset's or checkpoint's, 0.1 for GPT-2).
    0.0 makes a step independent of how the global batch is split (micro-batches, ranks)."""

    def __post_init__(self) -> None:
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1), or unset")


@dataclass(frozen=True)
class DataConfig:
    path: str = ""
    """A directory written by `cic-gpt2 prepare` (holds manifest.json, train/, val/, test/)."""
    max_length: Optional[int] = None
    """Truncate sequences to this many tokens (null: the manifest's max length)."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding, same epoch content)."""
    pad_to_multiple_of: int = 8
    """Dynamic padding to the longest in the batch, rounded up to this multiple (tensor cores)."""
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    """`shuffle`: each epoch is a permutation of the training split. `balanced`: each epoch (same number of
    steps) draws every example by picking a class uniformly among those in the training split, then a row of
    it, with replacement: rare classes are seen as often as common ones, their rows repeated. Seeded by
    (train.seed, epoch) alone; composes with group_by_length."""

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 8:
            raise ConfigError(f"data.max_length={self.max_length} is too small; use at least 8 or leave it unset")
        if self.pad_to_multiple_of < 1:
            raise ConfigError("data.pad_to_multiple_of must be >= 1")
        if self.sampler not in ("shuffle", "balanced"):
            raise ConfigError(f"data.sampler={self.sampler!r} is not one of shuffle, balanced")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1234
    """Seeds model init, shuffling and dropout; the same seed gives the same run."""
    epochs: float = 1.0
    """Passes over the training split (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run `epochs`)."""
    micro_batch_size: int = 8
    """Examples per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step. Global batch = micro_batch_size * grad_accum * world_size."""
    lr: float = 5e-4
    """Peak learning rate (after warmup)."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak, reached at the last step."""
    warmup_steps: int = 10
    """Linear warmup from 0 to `lr` over this many optimizer steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    extend_schedule: bool = False
    """On resume with another train.max_steps / train.epochs: re-plan the LR decay from the resume step (at
    the checkpoint's LR there) to min_lr_ratio at the new last step. False: such a resume is refused (the
    other schedule keys must always match the checkpoint's). Rule: docs/training.md."""
    weight_decay: float = 0.01
    """AdamW weight decay on weight matrices; biases and LayerNorm gains get none."""
    grad_clip: float = 1.0
    """Max global gradient norm (0: no clipping)."""
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    """`auto`: fp16 on V100-class GPUs, bf16 where the GPU supports it, fp32 on CPU."""
    ds_config: str = "auto"
    """A file in ds_configs/ (name or path). `auto` picks from precision and device."""
    eval_every: int = 0
    """Evaluate on the validation split every N optimizer steps (0: only at the end)."""
    eval_micro_batch_size: int = 0
    """Examples per rank per forward pass during evaluation (0: twice train.micro_batch_size)."""
    eval_max_rows: int = 0
    """Periodic validation (every eval_every steps) scores a fixed stratified subset of at most this many
    validation rows (0: all), so a huge validation split does not stall training; the end of training always
    scores the whole split."""
    select_best: bool = True
    """With eval_every: the model reported on test and exported is the step with the best validation
    macro-F1 (its checkpoint is never pruned); false: the last step. Test metrics never choose."""
    patience: int = 0
    """With eval_every: stop early after this many validations in a row without a better validation
    macro-F1 (0: train to the end)."""
    max_skipped_steps: int = 50
    """fp16: stop with advice after this many consecutive overflow-skipped steps."""
    class_weights: Literal["none", "balanced", "sqrt"] = "none"
    """Per-class loss weights from the training split's class counts n_c (n rows, C classes present):
    `balanced` w_c = n / (C * n_c) (scikit-learn's), `sqrt` w_c proportional to 1/sqrt(n_c); a class with no
    training rows gets 0. Scaled so that a training example's expected weight under data.sampler is 1 (with
    `shuffle`, `balanced` needs no scaling), and the loss of a micro-batch is mean(w_label * loss): the same
    for any split of the global batch. Training only: evaluation and the export are unweighted."""

    def __post_init__(self) -> None:
        for key in ("micro_batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        if self.max_steps < 0 or self.epochs <= 0:
            raise ConfigError("train.max_steps must be >= 0 and train.epochs > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.eval_max_rows < 0 or self.patience < 0:
            raise ConfigError("train.eval_max_rows and train.patience must be >= 0")
        if self.patience and not self.eval_every:
            raise ConfigError(f"train.patience={self.patience} needs periodic validation: set train.eval_every")
        if self.class_weights not in ("none", "balanced", "sqrt"):
            raise ConfigError(f"train.class_weights={self.class_weights!r} is not one of none, balanced, sqrt")


@dataclass(frozen=True)
class LogConfig:
    run_dir: str = "runs/latest"
    """Where metrics, plots, the resolved config, checkpoints and the export go."""
    log_every: int = 10
    """Log train metrics every N optimizer steps (host syncs happen only then)."""
    tensorboard: bool = True
    """Also write TensorBoard scalars to run_dir/tb (run_dir/metrics.jsonl is always written)."""
    progress: bool = True
    """Progress on rank 0: a bar on a terminal, a plain line every CIC_GPT2_PROGRESS_EVERY_S s into a log or
    under SLURM (docs/training.md, "Progress in logs")."""


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save a DeepSpeed checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Complete checkpoints to keep; older ones are pruned by rank 0."""
    resume: str = "none"
    """`none`, `auto` (latest complete checkpoint in run_dir/checkpoints, if any) or a checkpoint path."""
    export: bool = True
    """Write a Hugging Face model directory to run_dir/export at the end."""
    convert_timeout_s: float = 7200.0
    """Longest a resharding conversion to DeepSpeed's universal format may take (resume at another world
    size; rank 0 converts, the others wait); 0: no limit. `cic-gpt2 convert` does it before the job."""

    def __post_init__(self) -> None:
        if self.convert_timeout_s < 0:
            raise ConfigError(f"checkpoint.convert_timeout_s={self.convert_timeout_s} must be >= 0 (0: no limit)")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last={self.keep_last} must be >= 1")


@dataclass(frozen=True)
class DistConfig:
    timeout_s: float = 600.0
    """Collective timeout: a dead peer surfaces as an error after this long instead of a hang."""


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """GPT-2 size, weights and classification head."""
    data: DataConfig = field(default_factory=DataConfig)
    """The prepared dataset and how it is batched."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, schedule, batch sizes, precision and evaluation cadence."""
    log: LogConfig = field(default_factory=LogConfig)
    """Run directory, metrics and the progress bar."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """DeepSpeed checkpoints, resuming and the final export."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Process-group settings."""


# ==================== Machinery (generic over any nested frozen dataclass)
T = typing.TypeVar("T")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loader that rejects duplicated keys instead of silently keeping the last one."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"duplicated key {key!r} (line {key_node.start_mark.line + 1}); keep one")
        seen[key] = loader.construct_object(value_node, deep=deep)
    return seen


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# configs/ (shipped run recipes) sits at the repository root (editable installs); a wheel installs it as data
# files under <prefix>/share/cic-gpt2/configs.
_RECIPE_DIRS = (Path(__file__).resolve().parent.parent / "configs", Path(sys.prefix) / "share" / "cic-gpt2" / "configs")


def recipe_path(name: str) -> Path:
    """A shipped recipe by name (`cpu_tiny` -> configs/cpu_tiny.yaml), wherever the install put configs/."""
    for d in _RECIPE_DIRS:
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml"
    shipped = sorted({p.stem for d in _RECIPE_DIRS if d.is_dir() for p in d.glob("*.yaml")})
    raise ConfigError(f"config file {name} not found (not a file, and not a shipped recipe: "
                      f"{', '.join(shipped) or 'none installed'})")


def read_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file into a nested dict (duplicated keys are errors). A bare name that is not
    a file names a shipped recipe: `--config cpu_tiny` reads configs/cpu_tiny.yaml."""
    path = Path(path)
    if not path.is_file() and path.suffix == "" and len(path.parts) == 1:
        path = recipe_path(path.name)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_json_unique)
        else:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (SafeLoader subclass)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}".replace("\n", " ")) from None
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _json_unique(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ConfigError(f"duplicated key {k!r}; keep one")
        out[k] = v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """`["train.lr=3e-5", "model.name=gpt2"]` -> nested dict. Values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    seen: set[str] = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=3e-5)")
        dotted, raw = item.split("=", 1)
        dotted = dotted.strip().lstrip("-")
        if dotted in seen:
            raise ConfigError(f"override {dotted} given twice; keep one")
        seen.add(dotted)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted} conflicts with another override")
        node[parts[-1]] = value
    return nested


def merge(base: dict, update: dict) -> dict:
    """Deep-merge `update` into a copy of `base`."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return type(value)(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)) if origin is list else tuple(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "3e-5" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict, naming any unknown key or bad value by its dotted path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(prefix + str(k) for k in unknown)
        valid = ", ".join(prefix + k for k in fields)
        raise ConfigError(f"unknown config key {names} (valid keys here: {valid})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, key + ".")
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_config(cls: type[T] = RunConfig, path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """defaults < file < overrides -> a validated, frozen config."""
    data: dict = read_config_file(path) if path else {}
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
