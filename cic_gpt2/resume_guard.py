"""What a resume must share with the run it continues (#13 item 6): the prepared dataset and `train.seed`;
and each rank's RNG state, saved with every checkpoint.

`--resume auto` onto a checkpoint made from a differently prepared dataset (another split seed, other
classes, another dedup mode) would resume "at step k" of another shuffle of other rows; another `train.seed`
changes the data order and dropout masks. Both are refused, naming each differing key with both values. The
LR schedule keys are `schedule.check_resume`'s. `train.grad_clip` may change: DeepSpeed's ZeRO optimizer
restores `clip_grad` from the checkpoint, so `Checkpointer.load` sets this run's value back and says so.
"""
from __future__ import annotations

import hashlib
import json
import random
from typing import Any, Optional

import numpy as np
import torch

from cic_gpt2.errors import ConfigError

# Manifest keys that define which rows are in which split and what their token ids are.
DATA_KEYS = ("format", "template", "classes", "label_names", "split", "max_length", "max_per_class", "rows_read")


def data_identity(manifest: dict) -> dict:
    """The parts of a prepared manifest that make two datasets the same (not paths or creation times)."""
    ident = {k: manifest.get(k) for k in DATA_KEYS}
    ident["splits"] = {name: split.get("rows") for name, split in sorted(manifest.get("splits", {}).items())}
    ident["tokenizer"] = manifest.get("tokenizer", {}).get("fingerprint")
    ident["dedup"] = (manifest.get("dedup") or {}).get("mode")
    if manifest.get("binning"):  # the edges decide the bin words: same vocabulary, other meaning
        ident["binning"] = hashlib.sha256(json.dumps(manifest["binning"], sort_keys=True).encode()).hexdigest()[:16]
    return ident


def data_fingerprint(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(data_identity(manifest), sort_keys=True).encode()).hexdigest()[:16]


def _flat(prefix: str, value) -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(f"{prefix}.{k}", v))
        return out
    return {prefix: value}


def check_same_run(tag_dir, step: int, saved_manifest: Optional[dict], manifest: dict,
                   saved_train: Optional[dict], train_cfg) -> None:
    """ConfigError unless the resume uses the checkpoint's prepared dataset and train.seed."""
    if saved_manifest is not None:
        old, new = (_flat("", data_identity(m)) for m in (saved_manifest, manifest))
        diffs = [(k[1:], old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diffs:
            listed = "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diffs[:6]) + ("; ..." if len(diffs) > 6 else "")
            raise ConfigError(
                f"checkpoint {tag_dir} (step {step}) was trained on another prepared dataset (data fingerprint "
                f"{data_fingerprint(saved_manifest)}, this --data has {data_fingerprint(manifest)}): {listed}; "
                f"resume with the data it was trained on, or start a new --run-dir")
    saved_seed = (saved_train or {}).get("seed")
    if saved_seed is not None and saved_seed != train_cfg.seed:
        raise ConfigError(
            f"checkpoint {tag_dir} (step {step}) was trained with train.seed {saved_seed!r}, this run has "
            f"{train_cfg.seed!r}: the data order and dropout would not continue that run; set "
            f"train.seed={saved_seed} or start a new --run-dir")


def apply_grad_clip(engine, saved_train: Optional[dict], grad_clip: float) -> Optional[str]:
    """Put this run's train.grad_clip into the loaded ZeRO optimizer (DeepSpeed restored the checkpoint's);
    a note when the two differ."""
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "clip_grad"):
        optimizer.clip_grad = float(grad_clip)
    saved = (saved_train or {}).get("grad_clip")
    if saved is not None and float(saved) != float(grad_clip):
        return (f"train.grad_clip {saved} -> {grad_clip}: the resumed run clips at {grad_clip} (DeepSpeed would "
                f"have kept the checkpoint's {saved})")
    return None


# --------------------------------------------------------------------------------------------------
# RNG state (per rank: dropout masks differ between ranks and must continue exactly); saved by checkpoint.save
# --------------------------------------------------------------------------------------------------
def _numpy_state_to_torch(s: tuple) -> tuple:
    return (str(s[0]), torch.from_numpy(s[1].astype(np.int64)), int(s[2]), int(s[3]), float(s[4]))


def _numpy_state_from_torch(s: tuple) -> tuple:
    return (s[0], s[1].numpy().astype(np.uint32), int(s[2]), int(s[3]), float(s[4]))


def rng_state() -> dict:
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy's state as tensors and plain numbers, so the file loads with weights_only=True
        "numpy": _numpy_state_to_torch(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(_numpy_state_from_torch(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_new_rank(seed: int, rank: int, step: int) -> None:
    """Its own RNG stream from (train.seed, rank, step): without it every new rank keeps the state of the
    shared init seed, and they all draw the same dropout masks. Deterministic, so the resume stays exact."""
    value = int(np.random.SeedSequence([seed, rank, step, 0x5EED]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # CUDA generators too
