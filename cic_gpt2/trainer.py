"""The training loop and its components: the engine builder, a metrics window, a skip guard, the Trainer.

`build_trainer` puts a run together (model, DeepSpeed engine, checkpointer, logger); `Trainer.fit` is the
loop. What a run writes and how resume works: docs/training.md."""
from __future__ import annotations

import json
import math
import time
from typing import Optional

import yaml

import numpy as np
import pyarrow as pa

from cic_gpt2 import dist, perf
from cic_gpt2.checkpoint import Checkpointer
from cic_gpt2.config import RunConfig, to_dict
from cic_gpt2.data import stratified_subset
from cic_gpt2.errors import CicError, ConfigError
from cic_gpt2.files import write_text
from cic_gpt2.schedule import LrPlan


class TrainingStopped(CicError):
    """Training cannot usefully continue (e.g. fp16 loss scale stuck at its minimum)."""


def build_engine(cfg: RunConfig, classifier, ds_dict: dict, total_steps: int, plan: Optional[LrPlan] = None):
    """The DeepSpeed engine (collective: every rank). AdamW from the DeepSpeed dict, without weight decay on
    biases and LayerNorm gains; the LR schedule (`plan`, default the run config's warmup + decay over
    total_steps) as a LambdaLR that DeepSpeed steps (never on fp16-skipped steps) and saves with each
    checkpoint."""
    import deepspeed
    import torch

    tr = cfg.train
    decay, no_decay = [], []
    for p in classifier.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": tr.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    schedule = (plan or LrPlan.of(tr, total_steps)).ratio
    engine, _, _, _ = deepspeed.initialize(
        model=classifier,
        model_parameters=groups,
        config=dict(ds_dict),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    return engine


class SkipGuard:
    """Counts fp16 overflow-skipped optimizer steps and stops the run after `limit` in a row (pure). DeepSpeed's
    own scaler raises a bare Exception on an overflow at the minimum loss scale (the 18th in a row with the
    shipped zero2_fp16.json, before the default limit of 50): `stopped` turns that into the same advice."""

    MIN_SCALE_ERROR = "loss scale already at minimum"

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.in_a_row = limit, total, 0

    def update(self, skipped: int, step: int, loss_scale: float) -> None:
        self.total += skipped
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.in_a_row >= self.limit:
            raise self.stopped(f"{self.in_a_row} optimizer steps in a row were skipped", step, loss_scale)

    @staticmethod
    def stopped(what: str, step: int, loss_scale: float) -> TrainingStopped:
        return TrainingStopped(
            f"{what} for fp16 overflow (step {step}, loss scale {loss_scale:g}): the gradients overflow even at "
            f"the minimum loss scale. Lower train.lr, keep train.grad_clip > 0, use train.precision=bf16 on "
            f"A100/H100 or fp32, or raise train.max_skipped_steps (and lower fp16.min_loss_scale in the ds_config) "
            f"to keep trying")

    @classmethod
    def engine_step(cls, engine, step: int, loss_scale: float) -> None:
        """`engine.step()`, with DeepSpeed's minimum-loss-scale exception (raised on every rank alike: the
        overflow flag is all-reduced) converted to `stopped`'s one-line advice."""
        try:
            engine.step()
        except Exception as e:  # DeepSpeed raises a bare Exception here
            if cls.MIN_SCALE_ERROR not in str(e):
                raise
            raise cls.stopped("DeepSpeed stopped the run: a step was skipped at the minimum loss scale",
                              step, loss_scale) from None


class BestTracker:
    """Validation chooses the model: the best validation macro-F1 so far and its step, and early stopping
    after `patience` validations in a row without a better one (pure; its state rides in checkpoints)."""

    def __init__(self, patience: int = 0, best_step: int = -1, best_value: float = -math.inf, since_best: int = 0):
        self.patience, self.best_step, self.best_value, self.since_best = patience, best_step, best_value, since_best

    def update(self, step: int, value: float) -> bool:
        """Record one validation; True when it is the best so far (ties keep the earlier step)."""
        if value > self.best_value:
            self.best_step, self.best_value, self.since_best = step, value, 0
            return True
        self.since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.since_best >= self.patience

    def state(self) -> dict:
        return {"best_step": self.best_step, "best_value": self.best_value, "since_best": self.since_best}


class MetricsWindow:
    """This rank's counters since the last log step. The loss is summed on the device (no host sync per
    step); `summarize` all-reduces everything once, on log steps only, into train/ and perf/ metrics."""

    def __init__(self, device, world_size: int, flops_per_token: float, peak_flops: Optional[float]):
        self.device, self.world_size = device, world_size
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.micro_steps, self.tokens, self.samples = None, 0, 0, 0
        self.start_time = time.perf_counter()

    def add(self, loss, attention_mask) -> None:
        loss = loss.detach().float()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.micro_steps += 1
        self.tokens += int(attention_mask.sum())  # a host tensor: counting costs no device sync
        self.samples += attention_mask.shape[0]

    def summarize(self) -> dict:
        import torch

        f64 = torch.float64
        loss_sum = self.loss_sum.to(f64).cpu() if self.loss_sum is not None else torch.zeros((), dtype=f64)
        totals = torch.stack([loss_sum, *(torch.tensor(float(v), dtype=f64)
                                          for v in (self.micro_steps, self.tokens, self.samples))]).to(self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)  # host sync: log steps only
        loss_sum, micro_steps, tokens, samples = totals.tolist()
        elapsed = max(time.perf_counter() - self.start_time, 1e-9)
        metrics = {"train/loss": loss_sum / max(micro_steps, 1), "perf/tokens_per_s": tokens / elapsed,
                   "perf/samples_per_s": samples / elapsed}
        if self.peak_flops:
            metrics["perf/mfu"] = self.flops_per_token * tokens / elapsed / (self.peak_flops * self.world_size)
        self.reset()
        return metrics


class Trainer:
    """The loop: step; maybe log, validate, save; at a preemption signal save and exit 75."""

    def __init__(self, cfg: RunConfig, info: dist.DistInfo, engine, classifier, tokenizer, prepared,
                 checkpointer: Checkpointer, logger, watcher, total_steps: int, start_step: int = 0,
                 skipped_steps: int = 0, best: Optional[dict] = None, val_pending: bool = False,
                 lr_plan: Optional[LrPlan] = None):
        from cic_gpt2.progress import bar

        self.cfg, self.info, self.engine, self.classifier = cfg, info, engine, classifier
        self.tokenizer, self.prepared, self.label_names = tokenizer, prepared, prepared.label_names
        self.checkpointer, self.logger, self.watcher = checkpointer, logger, watcher
        self.device, self.is_main = dist.device(info), info.is_main
        self.total_steps, self.step, self.start_step = total_steps, start_step, start_step
        tr = cfg.train
        self.global_batch_size = tr.micro_batch_size * tr.grad_accum * info.world_size
        self.train_split = prepared.split("train")
        self.steps_per_epoch = len(self.train_split) // self.global_batch_size
        self.precision = perf.precision_name(engine)
        self.lr_plan = lr_plan or LrPlan.of(tr, total_steps)
        self.step_lr = 0.0  # the LR the last optimizer step ran with, read from the engine
        lengths = self.train_split["length"]
        seq_len = int(min(sum(lengths) / max(len(lengths), 1), cfg.data.max_length or math.inf)) or 1
        self.window = MetricsWindow(self.device, info.world_size,
                                    perf.flops_per_token(classifier.hf_model.config, seq_len),
                                    perf.peak_flops_per_s(perf.device_name(self.device), self.precision))
        self.skips = SkipGuard(tr.max_skipped_steps, skipped_steps)
        self.selecting = bool(tr.eval_every and tr.select_best)
        self.best = BestTracker(tr.patience, **(best or {}))
        self.val_pending = val_pending  # a preemption stopped this step's periodic validation: redo it first
        # Periodic validation's rows: the whole split (None) unless train.eval_max_rows asks for a subset.
        self.val_rows = (stratified_subset(prepared.table("val").column("label").to_numpy(), tr.eval_max_rows, tr.seed)
                         if tr.eval_every and tr.eval_max_rows else None)
        self.progress = bar(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            disable=not (self.is_main and cfg.log.progress))
        self._epoch_batches = None

    def fit(self) -> int:
        """Train to total_steps (0) or until a preemption signal, saved (EXIT_REQUEUE). The signal is
        honoured at every step boundary and between scoring rounds of a validation."""
        from cic_gpt2.preempt import EvaluationInterrupted

        try:
            if self.val_pending:  # resumed from a save made while this step was being validated
                self.select("val")
            while self.step < self.total_steps:
                self.train_step()
                if self.step % self.cfg.log.log_every == 0 or self.step == self.total_steps:
                    self.log_train_metrics()
                every = self.cfg.train.eval_every
                if every and self.step % every == 0 and self.step != self.total_steps:
                    self.val_pending = True
                    self.select("val")
                if self.checkpointer.due(self.step, self.total_steps):
                    self.save()
                if self.watcher.agreed():  # collective: every rank, every step boundary
                    return self.preempted()
                if self.selecting and self.best.should_stop:
                    self.say(f"early stop at step {self.step}: no better val macro-F1 in {self.best.patience} "
                             f"validations (best {self.best.best_value:.4f} at step {self.best.best_step})")
                    break
        except EvaluationInterrupted:
            return self.preempted(" while validating")
        self.progress.close()
        return 0

    def preempted(self, where: str = "") -> int:
        """Every rank: save this step (once) and return the requeue status."""
        from cic_gpt2.preempt import EXIT_REQUEUE

        self.save()
        self.say(f"preempted ({self.watcher.received or 'peer'}){where}: saved step {self.step}, exit {EXIT_REQUEUE}")
        return EXIT_REQUEUE

    def train_step(self) -> None:
        """One optimizer step: grad_accum micro-batches through the engine (it owns accumulation, loss
        scaling and clipping)."""
        skipped_before = self.engine.skipped_steps
        self.step_lr = float(self.engine.get_lr()[0])  # the engine's LR for this step (fp16 skips do not advance it)
        for batch in self._micro_batches():
            inputs = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask", "labels")}
            loss = self.engine(**inputs).loss
            self.engine.backward(loss)
            SkipGuard.engine_step(self.engine, self.step + 1, self.loss_scale())
            self.window.add(loss, batch["attention_mask"])
        self.step += 1
        # DeepSpeed's fp16 overflow check already synced on the host; reading the counter costs nothing more.
        self.skips.update(self.engine.skipped_steps - skipped_before, self.step, self.loss_scale())
        self.progress.update(1)

    def log_train_metrics(self) -> None:
        metrics = self.window.summarize()
        metrics.update({
            "train/lr": self.step_lr,
            "train/loss_scale": self.loss_scale(),
            "train/skipped_steps": self.skips.total,
            "train/epoch": self.step / self.steps_per_epoch,
            "perf/max_mem_gb": perf.peak_memory_gib(self.device)[0],
        })
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        self.logger.log(metrics, self.step)
        self.progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}", refresh=False)

    @property
    def periodic_val_rows(self) -> int:
        """How many validation rows periodic validation scores."""
        return len(self.val_rows) if self.val_rows is not None else self.prepared.table("val").num_rows

    def select(self, split: str = "val") -> None:
        """Periodic validation on the fixed subset; with selection, a new best is checkpointed at once."""
        metrics = self.validate(split, rows=self.val_rows)
        self.val_pending = False
        if self.selecting and self.best.update(self.step, metrics["macro_f1"]):
            self.save()

    def validate(self, split: str, rows: Optional[np.ndarray] = None) -> dict:
        """Metrics of `split` (its rows at positions `rows`, default all) on the current weights through the
        one scoring path (`inference`), identical for any world size; logged as `{split}/...`. Collective."""
        from cic_gpt2.inference import metrics_from_scores, pad_id_of, score_distributed

        table = self.prepared.table(split)
        if rows is not None and len(rows) < table.num_rows:
            table = table.take(pa.array(rows))
        batch_size = self.cfg.train.eval_micro_batch_size or 2 * self.cfg.train.micro_batch_size
        self.engine.eval()
        try:
            scores = score_distributed(
                self.engine, table.column("input_ids"), len(self.label_names), batch_size, self.device,
                pad_id_of(self.tokenizer), self.cfg.data.max_length, self.classifier.max_row_tokens,
                self.info.rank, self.info.world_size, self.device, multiple_of=self.cfg.data.pad_to_multiple_of,
                stop=self.watcher.agreed)
        finally:
            self.engine.train()
        metrics = metrics_from_scores(scores, table.column("label").to_numpy(), table.column("row_id").to_numpy(),
                                      self.label_names, split)
        self.logger.log({f"{split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, self.step)
        return metrics

    def save(self) -> None:
        """Collective: every rank calls it at the same step (a step already saved is not saved twice)."""
        epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
        self.checkpointer.save(self.engine, self.step, {
            "step": self.step, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "global_batch_size": self.global_batch_size, "seed": self.cfg.train.seed,
            "skipped_steps": self.skips.total, "best": self.best.state(), "val_pending": self.val_pending,
            "lr_plan": self.lr_plan.to_dict(),
        }, keep_steps=(self.best.best_step,) if self.selecting else ())

    def loss_scale(self) -> float:
        if self.precision != "fp16":
            return 1.0
        return float(getattr(self.engine.optimizer, "loss_scale", getattr(self.engine.optimizer, "cur_scale", 1.0)))

    def _micro_batches(self):
        """This rank's grad_accum micro-batches for optimizer step `self.step` (global batch contract)."""
        from cic_gpt2.data import train_batches

        epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
        if self._epoch_batches is None or self._epoch_batches[0] != epoch or step_in_epoch == 0:
            tr = self.cfg.train
            iterator = train_batches(
                self.train_split, epoch=epoch, start_step=step_in_epoch, seed=tr.seed,
                micro_batch_size=tr.micro_batch_size, grad_accum=tr.grad_accum, rank=self.info.rank,
                world_size=self.info.world_size, tokenizer=self.tokenizer, data_cfg=self.cfg.data)
            self._epoch_batches = (epoch, iterator)
        return next(self._epoch_batches[1])

    def say(self, text: str) -> None:
        if self.is_main:
            self.progress.write(text)

    def close(self) -> None:
        self.progress.close()
        self.logger.close()
        self.watcher.uninstall()


def build_trainer(cfg: RunConfig, info: dist.DistInfo, ds_dict: dict, prepared, tokenizer, resume_from, watcher):
    """Everything a run needs, built on every rank (the engine and a resharding conversion are collective)."""
    import torch

    from cic_gpt2.data import class_weights
    from cic_gpt2.checkpoint import read_marker
    from cic_gpt2.collective import agree, check_shared_dir, on_main
    from cic_gpt2.loggers import NullLogger, SharedFailureLogger, build_logger
    from cic_gpt2.model import build_model

    tr = cfg.train
    checkpointer = Checkpointer(cfg, info, resume_from, side_files={
        "run_config.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False),
        "data_manifest.json": json.dumps(prepared.manifest, indent=2) + "\n",
    })
    # Every rank picked its resume tag from its own listing: one run dir for all, and the same tag (#13 item 11).
    nonce = check_shared_dir(checkpointer.ckpt_dir.parent, info.rank, info.is_main)
    step = int(read_marker(resume_from)["step"]) if resume_from is not None else None
    agree((step, checkpointer.universal), f"the checkpoint to resume from in {checkpointer.ckpt_dir} (each rank lists "
          f"it itself: a stale directory listing on some node?); rerun, or pass --resume with one step-* dir",
          lambda v: "a fresh start" if v[0] is None else f"step {v[0]}" + (" via universal" if v[1] else ""))
    ds_dict = checkpointer.engine_config(ds_dict, nonce)  # what the engine runs with; export stores it too
    checkpointer.side_files["ds_config.json"] = json.dumps(ds_dict, indent=2) + "\n"
    torch.manual_seed(tr.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's weights)
    classifier = build_model(cfg.model, prepared.label_names, tokenizer, class_weights=class_weights(
        prepared.class_counts("train"), tr.class_weights, cfg.data.sampler))
    global_batch_size = tr.micro_batch_size * tr.grad_accum * info.world_size
    train_rows = len(prepared.split("train"))
    steps_per_epoch = train_rows // global_batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training split has {train_rows} rows, fewer than one global batch ({global_batch_size} = "
            f"micro_batch_size {tr.micro_batch_size} x grad_accum {tr.grad_accum} x {info.world_size} ranks): "
            f"lower train.micro_batch_size or train.grad_accum")
    total_steps = tr.max_steps or max(1, math.ceil(tr.epochs * steps_per_epoch))
    lr_plan = checkpointer.lr_plan(tr, total_steps, steps_per_epoch)
    engine = build_engine(cfg, classifier, ds_dict, total_steps, lr_plan)
    state = checkpointer.load(engine, global_batch_size)
    if state is None:
        torch.manual_seed(tr.seed + 1_000_003 * info.rank)  # dropout masks differ between ranks
    start_step = int(state["step"]) if state else 0
    run_dir = checkpointer.ckpt_dir.parent
    logger = SharedFailureLogger(on_main(info.is_main, f"opening the metrics files in {run_dir}", build_logger, run_dir,
                                         True, cfg.log.tensorboard, start_step if state else None) or NullLogger(),
                                 info.is_main, run_dir)
    on_main(info.is_main, f"writing {run_dir / 'config.yaml'} and ds_config.json", _write_configs, run_dir,
            checkpointer.side_files)
    trainer = Trainer(cfg, info, engine, classifier, tokenizer, prepared, checkpointer, logger, watcher, total_steps,
                      start_step, int(state.get("skipped_steps", 0)) if state else 0, (state or {}).get("best"),
                      bool((state or {}).get("val_pending", False)), lr_plan)
    trainer.say(
        f"training {total_steps} steps ({steps_per_epoch}/epoch, global batch {global_batch_size} = "
        f"{tr.micro_batch_size} x {tr.grad_accum} x {info.world_size} ranks, {trainer.precision}, "
        f"ZeRO-{engine.zero_optimization_stage()})"
        + (f", resumed from {checkpointer.resume_from} at step {start_step}" if state else "")
        + (" (resharded via a universal checkpoint)" if checkpointer.universal else "")
        + (f"; LR decay re-planned from step {lr_plan.decay_from} (train.extend_schedule)"
           if state and lr_plan.decay_from else ""))
    return trainer


def _write_configs(run_dir, side_files: dict) -> None:
    write_text(run_dir / "config.yaml", side_files["run_config.yaml"])
    write_text(run_dir / "ds_config.json", side_files["ds_config.json"])
