"""Model selection on validation, never test: BestTracker, the fixed validation subset, the best checkpoint
kept and exported, early stopping."""
import json

import numpy as np
import pytest

from cic_gpt2 import checkpoint as ckpt
from cic_gpt2.config import RunConfig, load_config
from cic_gpt2.data import stratified_subset
from cic_gpt2.errors import ConfigError
from cic_gpt2.loggers import read_jsonl
from cic_gpt2.trainer import BestTracker
from test_train import COMMON, train_single


def test_best_tracker_keeps_the_first_best_and_counts_patience():
    best = BestTracker(patience=2)
    assert best.update(2, 0.5) and not best.update(4, 0.5)  # a tie keeps the earlier step
    assert best.update(6, 0.7) and (best.best_step, best.since_best) == (6, 0)
    assert not best.update(8, 0.6) and not best.should_stop
    assert not best.update(10, 0.69) and best.should_stop
    again = BestTracker(2, **best.state())  # what a checkpoint carries restores it exactly
    assert again.state() == best.state() and again.should_stop
    assert not BestTracker(patience=0, since_best=99).should_stop  # 0: never stop early


def test_validation_subset_is_fixed_stratified_and_keeps_every_class():
    labels = np.repeat([0, 1, 2, 3], [900, 90, 9, 1])
    rows = stratified_subset(labels, 100, seed=5)
    assert np.array_equal(rows, stratified_subset(labels, 100, seed=5)) and np.all(np.diff(rows) > 0)
    counts = np.bincount(labels[rows], minlength=4)
    assert counts.tolist() == [90, 9, 1, 1]  # proportional, and no class present is left out
    assert np.array_equal(stratified_subset(labels, 0, seed=5), np.arange(len(labels)))
    assert np.array_equal(stratified_subset(labels, 5000, seed=5), np.arange(len(labels)))


def test_patience_without_periodic_validation_is_refused():
    with pytest.raises(ConfigError, match="train.eval_every"):
        load_config(RunConfig, None, ["train.patience=3"])


@pytest.mark.slow
def test_the_exported_model_is_the_best_validation_step_and_early_stopping_stops(prepared_v2, tmp_path):
    from cic_gpt2.exported import Export
    from cic_gpt2.inference import pad_id_of, score_rows
    from cic_gpt2.metrics import classification_metrics
    from cic_gpt2.prepared import Prepared

    run_dir = tmp_path / "run"
    overrides = [o for o in COMMON if not o.startswith(("train.max_steps", "train.lr"))]
    train_single("--data", prepared_v2, "--run-dir", run_dir, *overrides, "train.max_steps=40", "train.lr=3e-2",
                 "train.micro_batch_size=4", "train.eval_every=2", "train.eval_max_rows=120", "train.patience=3",
                 "checkpoint.every_steps=4", "checkpoint.keep_last=1")
    summary = json.loads((run_dir / "metrics.json").read_text())
    sel = summary["selection"]
    history = [(r["step"], r["val/macro_f1"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "val/macro_f1" in r]
    periodic = history[:-1]  # the last record is the chosen model on the whole split
    best_value = max(v for _, v in periodic)
    assert sel["step"] == next(s for s, v in periodic if v == best_value) == summary["selected_step"]
    assert sel["value"] == pytest.approx(best_value) and sel["rows"] <= 121 and sel["metric"] == "val/macro_f1"
    if sel["stopped_early"]:  # patience 3 validations of every 2 steps after the best
        assert summary["step"] == sel["step"] + 3 * 2 < 40
    else:
        assert summary["step"] == 40
    assert ckpt.is_complete(run_dir / "checkpoints" / ckpt.tag_for(sel["step"]))  # kept despite keep_last=1
    # The export is the chosen model: its predictions give the reported val metrics.
    export = Export.open(run_dir / "export")
    classifier, tokenizer = export.load()
    val = Prepared.load(prepared_v2).table("val")
    scores = score_rows(classifier, val.column("input_ids"), 16, "cpu", pad_id_of(tokenizer))
    exported = classification_metrics(val.column("label").to_numpy(), scores.argmax(axis=1), export.label_names)
    assert exported["confusion_matrix"] == summary["val"]["confusion_matrix"]
