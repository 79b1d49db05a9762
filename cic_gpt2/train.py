"""`cic-gpt2 train`: fine-tune GPT-2 as a traffic classifier with DeepSpeed ZeRO-2.

    cic-gpt2 train --data prepared/ --run-dir runs/r1                          # one process (CPU or 1 GPU)
    torchrun --nproc_per_node 4 -m cic_gpt2 train --data prepared/ --run-dir runs/r1 model.name=gpt2
    srun python -m cic_gpt2 train --config run.yaml --resume auto              # SLURM, one task per GPU
    cic-gpt2 train --config run.yaml train.lr=3e-5 train.micro_batch_size=16   # dotted overrides win

Every rank builds the same engine; only the engine steps (it owns accumulation, loss scaling, clipping).
Outputs (rank 0) in RUN_DIR: config.yaml, ds_config.json, metrics.jsonl, tb/, metrics.json,
loss_curve.png, confusion_matrix.png, checkpoints/step-NNNNNN/, export/. See docs/training.md.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from cic_gpt2 import checkpoint, dist, perf
from cic_gpt2.config import RunConfig, load_config, to_dict
from cic_gpt2.errors import CicError, ConfigError
from cic_gpt2.files import write_text

HELP = "fine-tune GPT-2 with DeepSpeed ZeRO-2 on prepared splits"

class TrainingStopped(CicError):
    """Training cannot usefully continue (e.g. fp16 loss scale stuck at its minimum)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML/JSON run config (defaults < file < KEY=VALUE overrides)")
    parser.add_argument("--data", help="prepared dataset directory (= data.path)")
    parser.add_argument("--run-dir", help="output directory (= log.run_dir)")
    parser.add_argument("--resume", help="none | auto | a checkpoint dir (= checkpoint.resume)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=3e-5")


def main(args: argparse.Namespace) -> int:
    flags = {"data.path": args.data, "log.run_dir": args.run_dir, "checkpoint.resume": args.resume}
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_config(RunConfig, args.config, overrides)
    info = dist.discover()
    # Everything that can be wrong with the inputs fails here, before any process group exists.
    from cic_gpt2 import ds_config
    from cic_gpt2.prepared import Prepared

    if not cfg.data.path:
        raise ConfigError("data.path is not set: pass --data DIR (a directory written by `cic-gpt2 prepare`)")
    ds_dict, ds_path = ds_config.load_and_build(cfg.train, info.world_size)
    prepared = Prepared.load(cfg.data.path)
    tokenizer = load_tokenizer_for(prepared, cfg.model)
    resume_from = checkpoint.resolve_resume(cfg.checkpoint.resume, cfg.log.run_dir)
    if resume_from is None and checkpoint.latest_complete(Path(cfg.log.run_dir) / "checkpoints") is not None:
        raise ConfigError(
            f"{cfg.log.run_dir} already holds checkpoints of an earlier run: continue it with --resume auto, "
            f"or pick a new --run-dir"
        )
    from cic_gpt2 import preflight

    preflight.check_train_run(cfg, prepared.manifest, info.world_size, ds_config.precision_of(ds_dict), resume_from)
    # Installed before the group and the model exist: a SIGUSR1/SIGTERM while the model loads (minutes for
    # GPT-2-Large) must still end in a checkpoint + exit 75 at the first step boundary, not in death.
    from cic_gpt2.preempt import PreemptionWatcher

    watcher = PreemptionWatcher().install()
    trainer = None
    try:
        dist.init(info, cfg.dist.timeout_s)
        trainer = Trainer(cfg, info, ds_dict, prepared, tokenizer, resume_from, watcher)
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        watcher.uninstall()
        dist.destroy()


def load_tokenizer_for(prepared, model_cfg):
    """The model's tokenizer; refuses a dataset whose ids were made by another (fingerprints differ)."""
    from cic_gpt2.model import load_model_tokenizer

    tokenizer = load_model_tokenizer(model_cfg)
    prepared.check_tokenizer(tokenizer, what=f"model {model_cfg.name}'s tokenizer")
    return tokenizer


def build_engine(cfg: RunConfig, classifier, ds_dict: dict, total_steps: int):
    """The DeepSpeed engine (collective: every rank). AdamW from the DeepSpeed dict, without weight decay on
    biases and LayerNorm gains; the run config's warmup + decay schedule as a LambdaLR that DeepSpeed steps
    (never on fp16-skipped steps) and saves with each checkpoint."""
    import deepspeed
    import torch

    from cic_gpt2.ds_config import lr_ratio

    tr = cfg.train
    decay, no_decay = [], []
    for p in classifier.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": tr.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    schedule = lambda step: lr_ratio(step, total_steps, tr.warmup_steps, tr.schedule, tr.min_lr_ratio)  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(
        model=classifier,
        model_parameters=groups,
        config=dict(ds_dict),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    return engine


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------
@dataclass
class Window:
    """Host-side counters since the last log step; loss is summed on the device (no sync per step)."""

    loss_sum: object = None  # device tensor, sum of micro-batch losses
    micro_steps: int = 0
    tokens: int = 0  # non-pad tokens, this rank
    samples: int = 0
    start_time: float = field(default_factory=time.perf_counter)


class Trainer:
    def __init__(self, cfg: RunConfig, info: dist.DistInfo, ds_dict: dict, prepared, tokenizer,
                 resume_from: Optional[Path], watcher=None):
        import torch

        from cic_gpt2 import data as data_mod
        from cic_gpt2.loggers import build_logger
        from cic_gpt2.model import build_model
        from cic_gpt2.preempt import PreemptionWatcher

        # A checkpoint from another world size is resharded through DeepSpeed's universal format.
        self.universal = resume_from is not None and checkpoint.saved_world_size(resume_from) != info.world_size
        if self.universal:
            checkpoint.convert_to_universal(resume_from, is_main=info.is_main)
            ds_dict = {**ds_dict, "checkpoint": {**ds_dict.get("checkpoint", {}), "load_universal": True}}
        self.cfg, self.info, self.ds_dict, self.prepared = cfg, info, ds_dict, prepared
        self.run_dir = Path(cfg.log.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.is_main = info.is_main
        self.device = dist.device(info)
        tr = cfg.train

        self.tokenizer = tokenizer
        self.label_names = list(prepared.label_names)

        torch.manual_seed(tr.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's weights)
        self.classifier = build_model(cfg.model, self.label_names, self.tokenizer)

        self.global_batch_size = tr.micro_batch_size * tr.grad_accum * info.world_size
        self.train_split = prepared.split("train")
        self.steps_per_epoch = len(self.train_split) // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training split has {len(self.train_split)} rows, fewer than one global batch "
                f"({self.global_batch_size} = micro_batch_size {tr.micro_batch_size} x grad_accum {tr.grad_accum} "
                f"x {info.world_size} ranks): lower train.micro_batch_size or train.grad_accum"
            )
        self.total_steps = tr.max_steps or max(1, math.ceil(tr.epochs * self.steps_per_epoch))

        self.engine = build_engine(cfg, self.classifier, ds_dict, self.total_steps)
        self.precision = perf.precision_name(self.engine)
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.last_eval_step = -1
        self.last_saved_step = -1
        self.start_step = 0
        if resume_from is not None:
            state = checkpoint.load(self.engine, resume_from, rank=info.rank, world_size=info.world_size,
                                    global_batch_size=self.global_batch_size, universal=self.universal)
            self.step = self.start_step = self.last_saved_step = int(state["step"])
            self.skipped_steps = int(state.get("skipped_steps", 0))
        else:
            torch.manual_seed(tr.seed + 1_000_003 * info.rank)  # dropout masks differ between ranks

        self.data = data_mod
        self.logger = build_logger(self.run_dir, info.is_main, cfg.log.tensorboard,
                                   resume_step=self.start_step if resume_from is not None else None)
        self.watcher = watcher if watcher is not None else PreemptionWatcher().install()
        self.flops_per_token = self._flops_per_token()
        self.peak = perf.peak_flops_per_s(perf.device_name(self.device), self.precision)
        self.progress = self._progress_bar()
        self.window = Window()
        self._epoch_batches = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
            write_text(self.run_dir / "ds_config.json", json.dumps(ds_dict, indent=2) + "\n")
        self._say(
            f"training {self.total_steps} steps ({self.steps_per_epoch}/epoch, global batch {self.global_batch_size} "
            f"= {tr.micro_batch_size} x {tr.grad_accum} x {info.world_size} ranks, {self.precision}, "
            f"ZeRO-{self.engine.zero_optimization_stage()})"
            + (f", resumed from {resume_from} at step {self.start_step}" if resume_from is not None else "")
            + (" (resharded via a universal checkpoint)" if self.universal else "")
        )

    # ---------------------------------------------------------------------------------------------- loop
    def fit(self) -> int:
        from cic_gpt2.preempt import EXIT_REQUEUE

        while self.step < self.total_steps:
            self.train_step()
            self.maybe_stop_on_skipped_steps()
            self.maybe_log()
            self.maybe_eval()
            self.maybe_save()
            if self.watcher.agreed():  # collective: every rank, every step boundary
                if self.last_saved_step != self.step:  # maybe_save may have just written this step
                    self.save()
                self._say(f"preempted ({self.watcher.received or 'peer'}): saved step {self.step}, exit {EXIT_REQUEUE}")
                return EXIT_REQUEUE
        self.finish()
        return 0

    def train_step(self) -> None:
        """One optimizer step: grad_accum micro-batches through the engine."""
        skipped_before = self.engine.skipped_steps
        for batch in self._micro_batches():
            inputs = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
            loss = self.engine(**inputs).loss
            self.engine.backward(loss)
            self.engine.step()
            loss = loss.detach().float()
            self.window.loss_sum = loss if self.window.loss_sum is None else self.window.loss_sum + loss
            self.window.micro_steps += 1
            mask = batch["attention_mask"]  # host tensor: counting costs no device sync
            self.window.tokens += int(mask.sum())
            self.window.samples += mask.shape[0]
        self.step += 1
        # DeepSpeed's fp16 overflow check already synced on the host; reading the counter costs nothing more.
        skipped_now = self.engine.skipped_steps - skipped_before
        self.skipped_steps += skipped_now
        self.consecutive_skips = self.consecutive_skips + 1 if skipped_now else 0
        self.progress.update(1)

    def maybe_stop_on_skipped_steps(self) -> None:
        if self.consecutive_skips < self.cfg.train.max_skipped_steps:
            return
        raise TrainingStopped(
            f"{self.consecutive_skips} optimizer steps in a row were skipped for fp16 overflow (step {self.step}, "
            f"loss scale {self._loss_scale():g}): the gradients overflow even at the minimum loss scale. "
            f"Lower train.lr, keep train.grad_clip > 0, use train.precision=bf16 on A100/H100 or fp32, "
            f"or raise train.max_skipped_steps to keep trying"
        )

    def maybe_log(self) -> None:
        if self.step % self.cfg.log.log_every and self.step != self.total_steps:
            return
        import torch

        w = self.window
        # Host sync, on log steps only: one all-reduce of [loss sum, micro-steps, tokens, samples].
        totals = torch.stack([
            w.loss_sum.to(torch.float64).cpu() if w.loss_sum is not None else torch.zeros((), dtype=torch.float64),
            torch.tensor(float(w.micro_steps), dtype=torch.float64),
            torch.tensor(float(w.tokens), dtype=torch.float64),
            torch.tensor(float(w.samples), dtype=torch.float64),
        ]).to(self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        loss_sum, micro_steps, tokens, samples = totals.tolist()
        elapsed = max(time.perf_counter() - w.start_time, 1e-9)
        tokens_per_s = tokens / elapsed
        metrics = {
            "train/loss": loss_sum / max(micro_steps, 1),
            "train/lr": self.cfg.train.lr * self._lr_ratio(self.step - 1),
            "train/loss_scale": self._loss_scale(),
            "train/skipped_steps": self.skipped_steps,
            "train/epoch": self.step / self.steps_per_epoch,
            "perf/tokens_per_s": tokens_per_s,
            "perf/samples_per_s": samples / elapsed,
            "perf/max_mem_gb": perf.peak_memory_gib(self.device)[0],
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        if self.peak:
            metrics["perf/mfu"] = self.flops_per_token * tokens_per_s / (self.peak * self.info.world_size)
        self.logger.log(metrics, self.step)
        self.progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}", refresh=False)
        self.window = Window()

    def maybe_eval(self) -> None:
        every = self.cfg.train.eval_every
        if every and self.step % every == 0 and self.step != self.total_steps:
            self.evaluate_and_log("val")

    def maybe_save(self) -> None:
        every = self.cfg.checkpoint.every_steps
        if every and self.step % every == 0 and self.step != self.total_steps:
            self.save()

    def finish(self) -> None:
        """End of training: final val + test metrics, checkpoint, report files, export."""
        self.progress.close()
        val = self.evaluate_and_log("val")
        test = self.evaluate_and_log("test")
        if self.last_saved_step != self.step:
            self.save()
        if not self.is_main:
            return
        summary = {
            "step": self.step,
            "epochs": self.step / self.steps_per_epoch,
            "world_size": self.info.world_size,
            "global_batch_size": self.global_batch_size,
            "skipped_steps": self.skipped_steps,
            "label_names": self.label_names,
            "val": val,
            "test": test,
        }
        write_text(self.run_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
        self.write_plots(test)
        if self.cfg.checkpoint.export:
            from cic_gpt2.export import export_hf

            export_hf(self.classifier, self.run_dir / "export", self.tokenizer, self.prepared.manifest,
                      to_dict(self.cfg), self.ds_dict)
        self._say(self._final_report(test))

    # ---------------------------------------------------------------------------------------------- eval
    def evaluate_and_log(self, split: str) -> dict:
        metrics = self.evaluate(split)
        self.last_eval_step = self.step if split == "val" else self.last_eval_step
        flat = {f"{split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        self.logger.log(flat, self.step)
        return metrics

    def evaluate(self, split: str) -> dict:
        """Metrics of `split` on the current weights, identical for any world size: every rank scores a
        contiguous slice, predictions are gathered, the sampler's padding duplicates (index -1) dropped."""
        import torch

        from cic_gpt2.metrics import classification_metrics

        dataset = self.prepared.split(split)
        indices, losses, logits_all = [], [], []
        self.engine.eval()
        with torch.no_grad():
            for batch in self.data.eval_batches(dataset, self._eval_batch_size(), self.info.rank,
                                                self.info.world_size, self.tokenizer, self.cfg.data):
                out = self.engine(input_ids=batch["input_ids"].to(self.device),
                                  attention_mask=batch["attention_mask"].to(self.device))
                logits = out.logits.float().cpu()
                losses.append(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none"))
                logits_all.append(logits)
                indices.append(batch["index"])
        self.engine.train()
        num_labels = len(self.label_names)
        local = torch.cat([
            torch.cat(indices).to(torch.float64).unsqueeze(1),
            torch.cat(losses).to(torch.float64).unsqueeze(1),
            torch.cat(logits_all).to(torch.float64),
        ], dim=1) if indices else torch.zeros((0, 2 + num_labels), dtype=torch.float64)
        gathered = self._all_gather(local)
        keep = gathered[:, 0] >= 0
        gathered = gathered[keep]
        gathered = gathered[torch.argsort(gathered[:, 0])]
        index = gathered[:, 0].long()
        if len(index) != len(dataset) or not torch.equal(index, torch.arange(len(dataset))):
            raise CicError(f"evaluation of {split} saw {len(index)} unique rows of {len(dataset)}: sampler bug")
        logits = gathered[:, 2:]
        y_true = torch.as_tensor(dataset["label"], dtype=torch.long)
        y_pred = logits.argmax(dim=1)
        probs = torch.softmax(logits, dim=1)
        metrics = classification_metrics(y_true.numpy(), y_pred.numpy(), self.label_names, probs=probs.numpy())
        metrics["loss"] = float(gathered[:, 1].sum() / len(index))
        return metrics

    def _all_gather(self, local):
        import torch

        if not (torch.distributed.is_initialized() and self.info.world_size > 1):
            return local
        # Slices are padded to equal length by the eval sampler, so the shapes agree across ranks.
        # On the backend's device (nccl gathers GPU tensors only); one gather per evaluation.
        local = local.to(self.device)
        buffers = [torch.empty_like(local) for _ in range(self.info.world_size)]
        torch.distributed.all_gather(buffers, local)
        return torch.cat(buffers).cpu()

    # ---------------------------------------------------------------------------------------------- checkpoints
    def save(self) -> None:
        """Collective: every rank calls it at the same step."""
        tr = self.cfg.train
        epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
        client_state = {
            "step": self.step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_batch_size": self.global_batch_size,
            "seed": tr.seed,
            "skipped_steps": self.skipped_steps,
        }
        side_files = {
            "run_config.yaml": yaml.safe_dump(to_dict(self.cfg), sort_keys=False),
            "data_manifest.json": json.dumps(self.prepared.manifest, indent=2) + "\n",
            "ds_config.json": json.dumps(self.ds_dict, indent=2) + "\n",
        }
        checkpoint.save(self.engine, self.ckpt_dir, self.step, client_state, rank=self.info.rank,
                        world_size=self.info.world_size, is_main=self.is_main, side_files=side_files,
                        keep_last=self.cfg.checkpoint.keep_last)
        self.last_saved_step = self.step

    # ---------------------------------------------------------------------------------------------- helpers
    def _micro_batches(self):
        """This rank's grad_accum micro-batches for optimizer step `self.step` (global batch contract)."""
        epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
        if self._epoch_batches is None or self._epoch_batches[0] != epoch or step_in_epoch == 0:
            iterator = self.data.train_batches(
                self.train_split, epoch=epoch, start_step=step_in_epoch, seed=self.cfg.train.seed,
                micro_batch_size=self.cfg.train.micro_batch_size, grad_accum=self.cfg.train.grad_accum,
                rank=self.info.rank, world_size=self.info.world_size, tokenizer=self.tokenizer,
                data_cfg=self.cfg.data,
            )
            self._epoch_batches = (epoch, iterator)
        return next(self._epoch_batches[1])

    def _eval_batch_size(self) -> int:
        return self.cfg.train.eval_micro_batch_size or 2 * self.cfg.train.micro_batch_size

    def _lr_ratio(self, step: int) -> float:
        from cic_gpt2.ds_config import lr_ratio

        tr = self.cfg.train
        return lr_ratio(step, self.total_steps, tr.warmup_steps, tr.schedule, tr.min_lr_ratio)

    def _loss_scale(self) -> float:
        if self.precision != "fp16":
            return 1.0
        return float(getattr(self.engine.optimizer, "loss_scale", getattr(self.engine.optimizer, "cur_scale", 1.0)))

    def _flops_per_token(self) -> float:
        lengths = self.train_split["length"]
        mean_len = float(sum(lengths) / max(len(lengths), 1))
        seq_len = int(min(mean_len, self.cfg.data.max_length or mean_len)) or 1
        return perf.flops_per_token(self.classifier.hf_model.config, seq_len)

    def _progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not (self.is_main and self.cfg.log.progress))

    def write_plots(self, test_metrics: dict) -> None:
        from cic_gpt2.loggers import read_jsonl
        from cic_gpt2.plots import plot_confusion_matrix, plot_loss_curve, plot_per_class_f1

        plot_loss_curve(read_jsonl(self.run_dir / "metrics.jsonl"), self.run_dir / "loss_curve.png")
        plot_confusion_matrix(test_metrics["confusion_matrix"], self.label_names, self.run_dir / "confusion_matrix.png",
                              title=f"test split, step {self.step}")
        plot_per_class_f1(test_metrics, self.run_dir / "per_class_f1.png")

    def _final_report(self, test: dict) -> str:
        from cic_gpt2.metrics import metrics_markdown

        return (metrics_markdown(test, title=f"test split after {self.step} steps") +
                f"\nrun dir: {self.run_dir}  (TensorBoard: tensorboard --logdir {self.run_dir / 'tb'})")

    def _say(self, text: str) -> None:
        if self.is_main:
            self.progress.write(text) if hasattr(self, "progress") else print(text, flush=True)

    def close(self) -> None:
        self.progress.close()
        self.logger.close()
        self.watcher.uninstall()
