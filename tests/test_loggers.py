"""One logger protocol; rank 0 writes JSONL + TensorBoard, other ranks nothing; resume keeps one history."""
import json
import math

import pytest

from cic_gpt2.loggers import JsonlLogger, LoggerContainer, NullLogger, build_logger, read_jsonl


def _tb_scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_main_rank_writes_jsonl_and_tensorboard(tmp_path):
    logger = build_logger(tmp_path, is_main=True)
    logger.log({"train/loss": 2.5, "train/lr": 1e-3}, step=1)
    logger.log({"train/loss": 2.0, "val/macro_f1": 0.5, "train/skipped_steps": 0}, step=2)
    logger.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["train/loss"] == 2.5 and records[1]["val/macro_f1"] == 0.5
    scalars = _tb_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert scalars["val/macro_f1"] == [(2, 0.5)]


def test_other_ranks_get_a_logger_that_writes_nothing(tmp_path):
    logger = build_logger(tmp_path / "r1", is_main=False)
    assert isinstance(logger, NullLogger)
    logger.log({"train/loss": 1.0}, step=1)
    logger.close()
    assert not (tmp_path / "r1").exists()


def test_non_finite_values_stay_valid_json_and_non_numbers_are_refused(tmp_path):
    logger = JsonlLogger(tmp_path / "m.jsonl")
    logger.log({"train/loss": math.nan, "train/grad_norm": math.inf}, step=3)
    with pytest.raises(TypeError, match="train/tag"):
        logger.log({"train/tag": "x"}, step=4)
    logger.close()
    line = (tmp_path / "m.jsonl").read_text().splitlines()[0]
    assert json.loads(line) == {"step": 3, "time": json.loads(line)["time"], "train/loss": None, "train/grad_norm": None}


def test_resume_keeps_history_up_to_the_checkpoint_and_fresh_run_starts_over(tmp_path):
    first = build_logger(tmp_path, is_main=True, tensorboard=False)
    for step in range(1, 7):
        first.log({"train/loss": float(step)}, step)
    first.close()
    resumed = build_logger(tmp_path, is_main=True, tensorboard=False, resume_step=4)
    resumed.log({"train/loss": 50.0}, 5)
    resumed.close()
    assert [(r["step"], r["train/loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]
    build_logger(tmp_path, is_main=True, tensorboard=False).close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == []


def test_container_fans_out_to_every_backend(tmp_path):
    a, b = JsonlLogger(tmp_path / "a.jsonl"), JsonlLogger(tmp_path / "b.jsonl")
    container = LoggerContainer([a, b])
    container.log({"perf/tokens_per_s": 10.0}, 7)
    container.log({}, 8)  # nothing to write: no empty records
    container.close()
    for name in ("a.jsonl", "b.jsonl"):
        assert [(r["step"], r["perf/tokens_per_s"]) for r in read_jsonl(tmp_path / name)] == [(7, 10.0)]
