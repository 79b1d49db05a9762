"""`cic-gpt2 train`: fine-tune GPT-2 as a traffic classifier with DeepSpeed ZeRO-2.

    cic-gpt2 train --data prepared/ --run-dir runs/r1                          # one process (CPU or 1 GPU)
    torchrun --nproc_per_node 4 -m cic_gpt2 train --data prepared/ --run-dir runs/r1 model.name=gpt2
    srun python -m cic_gpt2 train --config run.yaml --resume auto              # SLURM, one task per GPU
    cic-gpt2 train --config run.yaml train.lr=3e-5 train.micro_batch_size=16   # dotted overrides win

The loop is `trainer.Trainer`; outputs, resume and preemption: docs/training.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cic_gpt2 import dist
from cic_gpt2.config import RunConfig, load_config, to_dict
from cic_gpt2.config_doc import config_help
from cic_gpt2.errors import ConfigError
from cic_gpt2.files import write_text

HELP = "fine-tune GPT-2 with DeepSpeed ZeRO-2 on prepared splits"


def epilog() -> str:
    """`cic-gpt2 train --help`: every config key with its type, default and doc."""
    return config_help()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML/JSON run config (defaults < file < KEY=VALUE overrides)")
    parser.add_argument("--data", help="prepared dataset directory (= data.path)")
    parser.add_argument("--run-dir", help="output directory (= log.run_dir)")
    parser.add_argument("--resume", help="none | auto | a checkpoint dir (= checkpoint.resume)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=3e-5")


def main(args: argparse.Namespace) -> int:
    from cic_gpt2 import ds_config, preempt, preflight
    from cic_gpt2.checkpoint import Checkpointer, tag_for
    from cic_gpt2.model import load_model_tokenizer
    from cic_gpt2.preempt import PreemptionWatcher
    from cic_gpt2.prepared import Prepared
    from cic_gpt2.trainer import build_trainer

    flags = {"data.path": args.data, "log.run_dir": args.run_dir, "checkpoint.resume": args.resume}
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_config(RunConfig, args.config, overrides)
    info = dist.discover()
    # Everything that can be wrong with the inputs fails here, before any process group exists.
    if not cfg.data.path:
        raise ConfigError("data.path is not set: pass --data DIR (a directory written by `cic-gpt2 prepare`)")
    ds_dict, _ = ds_config.load_and_build(cfg.train, info.world_size)
    prepared = Prepared.load(cfg.data.path)
    tokenizer = load_model_tokenizer(cfg.model, prepared.manifest)
    prepared.check_tokenizer(tokenizer, what=f"model {cfg.model.name}'s tokenizer")
    resume_from = Checkpointer.resolve(cfg, info.is_main)
    preflight.check_train_run(cfg, prepared.manifest, info.world_size, ds_config.precision_of(ds_dict), resume_from)
    preempted_status = preempt.exit_status()  # 75, or 0 under cic_gpt2.supervise (which returns 75 itself)
    if info.is_main:
        preempt.clear_marker(cfg.log.run_dir)
    # Installed before the group and the model exist: a SIGUSR1/SIGTERM while the model loads (minutes for
    # GPT-2-Large) must still end in a checkpoint + exit 75 at the first step boundary, not in death.
    watcher = PreemptionWatcher().install()
    trainer = None
    try:
        dist.init(info, cfg.dist.timeout_s)
        trainer = build_trainer(cfg, info, ds_dict, prepared, tokenizer, resume_from, watcher)
        status = trainer.fit()
        if status == 0:
            status = finish(trainer)  # 75 too when preempted during the final evaluation
        if status == preempt.EXIT_REQUEUE:
            tag_dir = trainer.checkpointer.ckpt_dir / tag_for(trainer.step)
            preempt.mark_preempted(cfg.log.run_dir, tag_dir, trainer.step, info.is_main)
            return preempted_status
        return status
    finally:
        if trainer is not None:
            trainer.close()
        watcher.uninstall()
        dist.destroy()


def finish(trainer) -> int:
    """End of training (every rank): the last step is checkpointed first, then validated like the others; the
    model validation chose (train.select_best) is loaded back, scored on the whole val split and, once, on
    test. Then rank 0 writes metrics.json, the plots and the export of that model and prints the report. A
    preemption during these evaluations saves nothing new (the last step is saved) and returns 75; the resumed
    run starts again here."""
    from cic_gpt2.exported import export_hf
    from cic_gpt2.metrics import metrics_markdown
    from cic_gpt2.preempt import EvaluationInterrupted

    trainer.save()  # before the final evaluation: a preemption during it loses no training
    try:
        selection = None
        if trainer.selecting:
            trainer.select("val")  # the last step is a candidate too
            best = trainer.best
            selection = {"metric": "val/macro_f1", "rows": trainer.periodic_val_rows, "step": best.best_step,
                         "value": best.best_value, "stopped_early": best.should_stop}
        selected_step = selection["step"] if selection else trainer.step
        if selected_step != trainer.step:
            trainer.checkpointer.load_weights(trainer.engine, selected_step)
            trainer.say(f"selected step {selected_step} (best val macro-F1 {selection['value']:.4f} on "
                        f"{selection['rows']} rows); final metrics and export are of that model")
        val, test = trainer.validate("val"), trainer.validate("test")
    except EvaluationInterrupted:
        return trainer.preempted(" during the final evaluation")
    if not trainer.is_main:
        return 0
    run_dir, cfg = trainer.checkpointer.ckpt_dir.parent, trainer.cfg
    summary = {"step": trainer.step, "selected_step": selected_step, "selection": selection,
               "epochs": trainer.step / trainer.steps_per_epoch,
               "world_size": trainer.info.world_size, "global_batch_size": trainer.global_batch_size,
               "skipped_steps": trainer.skips.total, "label_names": trainer.label_names, "val": val, "test": test}
    write_text(run_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    write_plots(run_dir, test, trainer.label_names, selected_step)
    if cfg.checkpoint.export:
        export_hf(trainer.engine.module, run_dir / "export", trainer.tokenizer, trainer.prepared.manifest, to_dict(cfg),
                  json.loads(trainer.checkpointer.side_files["ds_config.json"]), training_membership(trainer.prepared))
    trainer.say(metrics_markdown(test, title=f"test split, model of step {selected_step} of {trainer.step}")
                + f"\nrun dir: {run_dir}  (TensorBoard: tensorboard --logdir {run_dir / 'tb'})")
    return 0


def training_membership(prepared):
    """The train split's vector set for the export (None for data prepared before train_hashes.npy existed)."""
    from cic_gpt2.errors import DataError
    from cic_gpt2.membership import Membership

    try:
        return Membership.build(prepared.train_hashes())
    except DataError:
        return None


def write_plots(run_dir: Path, test_metrics: dict, label_names: list[str], step: int) -> None:
    from cic_gpt2.loggers import read_jsonl
    from cic_gpt2.plots import plot_confusion_matrix, plot_loss_curve, plot_per_class_f1

    plot_loss_curve(read_jsonl(run_dir / "metrics.jsonl"), run_dir / "loss_curve.png")
    plot_confusion_matrix(test_metrics["confusion_matrix"], label_names, run_dir / "confusion_matrix.png",
                          title=f"test split, step {step}")
    plot_per_class_f1(test_metrics, run_dir / "per_class_f1.png")
