"""DeepSpeed config: engine knobs from `ds_configs/*.json`, batch/optimizer/clipping from the run config.

`load_and_build(train, world_size)` picks the JSON and `build_ds_config` fills the run config into a new dict,
checking the batch arithmetic before any process group exists. The shipped JSONs and what each is for:
docs/training.md ("The DeepSpeed config").
"""
from __future__ import annotations

import copy
import json
import sys
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cic_gpt2.config import TrainConfig
from cic_gpt2.errors import ConfigError

# ds_configs/ sits at the repository root (editable installs); a wheel installs it as data files under
# <prefix>/share/cic-gpt2/ds_configs.
_CANDIDATES = (Path(__file__).resolve().parent.parent / "ds_configs", Path(sys.prefix) / "share" / "cic-gpt2" / "ds_configs")
CONFIG_DIR = next((d for d in _CANDIDATES if d.is_dir()), _CANDIDATES[0])

# Keys the run config owns; a ds_config JSON that sets them would silently fight `train.*`.
RUN_CONFIG_KEYS = {
    "train_batch_size": "train.micro_batch_size / train.grad_accum",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr / train.weight_decay",
    "scheduler": "train.schedule / train.warmup_steps / train.min_lr_ratio",
}
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class DeviceCaps:
    """What the accelerator can do; decides `auto` precision and the optimizer implementation."""

    kind: str  # "cuda" | "cpu"
    name: str
    fp16: bool
    bf16: bool

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"


def detect_device() -> DeviceCaps:
    """Capabilities of this process's accelerator (no process group needed)."""
    import torch

    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        # torch reports bf16 "supported" on V100 through emulation; only Ampere+ has it in hardware.
        return DeviceCaps("cuda", torch.cuda.get_device_name(), fp16=major >= 7, bf16=major >= 8)
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    return DeviceCaps("cpu", "cpu", fp16=bool(accel.is_fp16_supported()), bf16=bool(accel.is_bf16_supported()))


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_ds_config_path(name: str, precision: str, device: DeviceCaps) -> Path:
    """`train.ds_config` (a name in ds_configs/, a path, or `auto`) -> a JSON file."""
    if name == "auto":
        precision = precision if precision != "auto" else auto_precision(device)
        if device.is_cuda:
            name = {"fp16": "zero2_fp16", "bf16": "zero2_bf16", "fp32": "zero2_fp32"}[precision]
        elif precision == "fp16":
            raise ConfigError(
                "train.precision=fp16 is not supported on this CPU (DeepSpeed's accelerator reports no fp16): "
                "use train.precision=fp32 or bf16"
            )
        else:
            name = {"bf16": "zero2_cpu_bf16", "fp32": "zero2_cpu"}[precision]
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.json"):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"train.ds_config={name!r}: no such file, nor in {CONFIG_DIR} (available: {', '.join(available_configs())})"
    )


def auto_precision(device: DeviceCaps) -> str:
    if not device.is_cuda:
        return "fp32"
    return "bf16" if device.bf16 else "fp16"


def load_ds_json(path: Path) -> dict:
    """Read and check an engine-knob JSON; every problem is a ConfigError naming the file and key."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object")
    for key, owner in RUN_CONFIG_KEYS.items():
        if key in data:
            raise ConfigError(f"DeepSpeed config {path} sets {key!r}; remove it and set {owner} in the run config")
    zero = data.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed config {path}: zero_optimization.stage must be 0, 1, 2 or 3")
    if precision_of(data) == "both":
        raise ConfigError(f"DeepSpeed config {path} enables both fp16 and bf16; keep one")
    return data


def offload_device(ds: dict) -> str:
    """Where ZeRO offloads the optimizer: "none", "cpu" or "nvme"."""
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") or "none"


def precision_of(ds: dict) -> str:
    fp16 = bool(ds.get("fp16", {}).get("enabled", False))
    bf16 = bool(ds.get("bf16", {}).get("enabled", False)) or bool(ds.get("bfloat16", {}).get("enabled", False))
    return "both" if fp16 and bf16 else "fp16" if fp16 else "bf16" if bf16 else "fp32"


def build_ds_config(base: dict, train: TrainConfig, world_size: int, device: DeviceCaps, source: str = "") -> dict:
    """Pure: engine knobs `base` + batch/optimizer/clipping from `train` -> a new DeepSpeed dict."""
    where = f"DeepSpeed config {source}" if source else "DeepSpeed config"
    precision = precision_of(base)
    if train.precision != "auto" and train.precision != precision:
        raise ConfigError(
            f"train.precision={train.precision} but {where} runs {precision}; "
            f"set train.precision=auto or pick a matching train.ds_config"
        )
    if precision == "fp16" and not device.fp16:
        raise ConfigError(f"{where} enables fp16, which {device.name} does not support: use bf16 or fp32 (train.precision)")
    if precision == "bf16" and not device.bf16:
        raise ConfigError(f"{where} enables bf16, which {device.name} does not support: use fp16 (zero2_fp16) instead")
    offload = offload_device(base)
    if offload != "none" and not device.is_cuda:
        raise ConfigError(f"{where} offloads the optimizer to {offload}, which needs a CUDA device; use zero2_cpu on CPU")

    ds = copy.deepcopy(base)
    ds["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    ds["gradient_accumulation_steps"] = train.grad_accum
    ds["train_batch_size"] = train.micro_batch_size * train.grad_accum * world_size
    ds["gradient_clipping"] = float(train.grad_clip)
    params = {"lr": train.lr, "betas": list(ADAM_BETAS), "eps": ADAM_EPS, "weight_decay": train.weight_decay}
    if not device.is_cuda:
        # FusedAdam / DeepSpeedCPUAdam are CUDA / compiled ops; plain torch AdamW is exact and portable on CPU.
        params["torch_adam"] = True
    ds["optimizer"] = {"type": "AdamW", "params": params}
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    return ds


def load_and_build(train: TrainConfig, world_size: int, device: Optional[DeviceCaps] = None) -> tuple[dict, Path]:
    """`train.ds_config` -> (final DeepSpeed dict, the JSON it came from). Call before any process group."""
    device = device or detect_device()
    path = resolve_ds_config_path(train.ds_config, train.precision, device)
    return build_ds_config(load_ds_json(path), train, world_size, device, source=str(path)), path


def lr_ratio(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup to 1, then decay to `min_lr_ratio`
    at the last step (`cosine`, `linear`) or stay at 1 (`constant`)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape
