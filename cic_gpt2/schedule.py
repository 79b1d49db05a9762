"""The LR schedule a run follows, and what resuming may change about it.

`LrPlan` is the schedule as a value: warmup + decay over `total_steps` (`ds_config.lr_ratio`), or, after
`train.extend_schedule`, a decay re-planned from the step it was extended at. It rides in every checkpoint's
COMPLETE marker, so a resumed run follows exactly the curve the saved one did. `check_resume` compares the
schedule-defining keys of the run config with the checkpoint's. The rule: docs/training.md ("Resuming with
a longer run").
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

from cic_gpt2.errors import ConfigError

# The keys that define the LR curve; a resume must keep them (extend_schedule may change the length only).
LENGTH_KEYS = ("max_steps", "epochs")
SHAPE_KEYS = ("lr", "schedule", "warmup_steps", "min_lr_ratio")


@dataclass(frozen=True)
class LrPlan:
    total_steps: int
    warmup_steps: int
    schedule: str
    min_lr_ratio: float
    decay_from: int = 0
    """0: the plain schedule. > 0: extended at this step; from here the decay runs from `decay_from_ratio`
    to `min_lr_ratio` at the last step."""
    decay_from_ratio: float = 1.0

    @classmethod
    def of(cls, train_cfg, total_steps: int) -> "LrPlan":
        return cls(total_steps, train_cfg.warmup_steps, train_cfg.schedule, train_cfg.min_lr_ratio)

    def ratio(self, step: int) -> float:
        """LR multiplier of optimizer step `step` (0-based). In an extended plan, steps after warmup and
        before `decay_from` are history (another plan ran them): they read as `decay_from_ratio`."""
        from cic_gpt2.ds_config import lr_ratio

        if not self.decay_from or step < self.warmup_steps:
            return lr_ratio(step, self.total_steps, self.warmup_steps, self.schedule, self.min_lr_ratio)
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, max(0, step - self.decay_from) / max(1, self.total_steps - self.decay_from - 1))
        shape = 1.0 - progress if self.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (self.decay_from_ratio - self.min_lr_ratio) * shape

    def extended(self, total_steps: int, at_step: int) -> "LrPlan":
        """The plan continuing this one at `at_step` and ending at `total_steps`: unchanged up to
        max(at_step, warmup_steps); from there the decay starts at this plan's LR there and reaches
        min_lr_ratio at the new last step."""
        if total_steps == self.total_steps:
            return self
        start = max(at_step, self.warmup_steps)
        return replace(self, total_steps=total_steps, decay_from=start, decay_from_ratio=self.ratio(start))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LrPlan":
        return cls(**data)


def schedule_changes(saved_train: dict, train_cfg) -> list[tuple[str, object, object]]:
    """(key, saved value, this run's value) for each schedule-defining key that differs. `epochs` counts
    only where a run has no max_steps (it is ignored otherwise)."""
    keys = ["max_steps"] + (["epochs"] if not (saved_train.get("max_steps") and train_cfg.max_steps) else [])
    changes = []
    for key in keys + list(SHAPE_KEYS):
        if key in saved_train and saved_train[key] != getattr(train_cfg, key):
            changes.append((key, saved_train[key], getattr(train_cfg, key)))
    return changes


def check_resume(saved_train: Optional[dict], train_cfg, tag_dir, step: int) -> bool:
    """Refuse a resume whose schedule keys differ from the checkpoint's, unless train.extend_schedule
    allows a new length. True when the plan is to be extended to this run's length."""
    changes = schedule_changes(saved_train or {}, train_cfg)
    if not changes:
        return False
    listed = ", ".join(f"train.{k} {old!r} -> {new!r}" for k, old, new in changes)
    shape = [c for c in changes if c[0] in SHAPE_KEYS]
    if not train_cfg.extend_schedule:
        raise ConfigError(
            f"checkpoint {tag_dir} (step {step}) was trained with another LR schedule: {listed}; resuming would "
            f"not continue that run. Set those keys back to the checkpoint's values"
            + ("" if shape else f", or pass train.extend_schedule=true to re-plan the decay from step {step} "
                                "to the new end (docs/training.md)"))
    if shape:
        raise ConfigError(
            f"train.extend_schedule changes only the run's length (train.max_steps / train.epochs), but "
            f"checkpoint {tag_dir} differs in: {', '.join(f'train.{k} {o!r} -> {n!r}' for k, o, n in shape)}; "
            f"set those back to the checkpoint's values")
    return True
