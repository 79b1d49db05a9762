"""Checkpoint bookkeeping: only complete tags count, pruning keeps the newest complete ones, resume rules.

(The engine side - save/load through DeepSpeed, exact resume - is exercised by tests/test_train.py.)"""
import json
import random

import numpy as np
import pytest
import torch

from cic_gpt2 import checkpoint as ckpt
from cic_gpt2.errors import ConfigError


def _tag(root, step, complete=True, world_size=2):
    d = root / ckpt.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    if complete:
        (d / ckpt.COMPLETE_MARKER).write_text(json.dumps({"step": step, "world_size": world_size}))
    return d


def test_tags_sort_by_step_and_partial_ones_are_never_latest(tmp_path):
    root = tmp_path / "checkpoints"
    _tag(root, 5)
    _tag(root, 40)
    _tag(root, 100, complete=False)  # a save that was interrupted
    (root / "latest").write_text("step-000100")  # DeepSpeed's pointer names the partial one: ignored
    assert ckpt.tag_for(40) == "step-000040"
    assert [(s, ok) for s, _, ok in ckpt.list_checkpoints(root)] == [(5, True), (40, True), (100, False)]
    assert ckpt.latest_complete(root) == root / "step-000040"
    assert ckpt.resolve_resume("auto", tmp_path) == root / "step-000040"
    assert ckpt.latest_complete(tmp_path / "nothing-here") is None


def test_resume_specs(tmp_path):
    root = tmp_path / "checkpoints"
    assert ckpt.resolve_resume("none", tmp_path) is None
    assert ckpt.resolve_resume("auto", tmp_path) is None, "auto with no checkpoint starts fresh"
    done = _tag(root, 8)
    partial = _tag(root, 12, complete=False)
    assert ckpt.resolve_resume(str(done), tmp_path) == done
    with pytest.raises(ConfigError, match="step-000012 is not a complete checkpoint"):
        ckpt.resolve_resume(str(partial), tmp_path)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        ckpt.resolve_resume(str(root / "step-999999"), tmp_path)


def test_prune_keeps_the_newest_complete_and_never_touches_partial(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        _tag(root, step)
    _tag(root, 5, complete=False)
    _tag(root, 40, complete=False)
    removed = ckpt.prune(root, keep_last=2)
    assert [p.name for p in removed] == ["step-000010"]
    assert sorted(p.name for p in root.iterdir()) == ["step-000005", "step-000020", "step-000030", "step-000040"]


def test_marker_records_the_world_size_that_wrote_it(tmp_path):
    tag = _tag(tmp_path / "checkpoints", 8, world_size=2)
    assert ckpt.saved_world_size(tag) == 2


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.random(), np.random.rand(), torch.rand(1)  # move on
    ckpt.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def _sized_tag(root, step):
    """A complete tag whose marker records its files' sizes, as `checkpoint.save` writes it."""
    d = _tag(root, step, complete=False)
    (d / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"optimizer partition")
    marker = {"step": step, "world_size": 2, "files": ckpt.file_sizes(d)}
    (d / ckpt.COMPLETE_MARKER).write_text(json.dumps(marker))
    return d


def test_auto_resume_skips_a_newest_checkpoint_with_a_truncated_file_and_names_it(tmp_path):
    root = tmp_path / "checkpoints"
    older, newest = _sized_tag(root, 4), _sized_tag(root, 8)
    assert ckpt.verify(newest) is None and ckpt.resolve_resume("auto", tmp_path) == newest
    shard = newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"optim")  # truncated: 5 of 19 bytes
    said = []
    assert ckpt.resolve_resume("auto", tmp_path, said.append) == older
    assert len(said) == 1 and str(shard) in said[0] and "5 bytes, the marker recorded 19" in said[0], said
    assert f"resuming from the previous complete checkpoint {older}" in said[0]
    with pytest.raises(ConfigError, match="is damaged: .*zero_pp_rank_1"):
        ckpt.resolve_resume(str(newest), tmp_path)
    (older / "mp_rank_00_model_states.pt").unlink()  # nothing usable left: refused, naming the newest
    with pytest.raises(ConfigError, match="step-000008 is damaged"):
        ckpt.resolve_resume("auto", tmp_path, said.append)
    assert any("mp_rank_00_model_states.pt is missing" in s for s in said), said


def test_files_are_fsynced_by_the_rank_whose_name_they_carry():
    assert [ckpt._rank_of(n) for n in ("mp_rank_00_model_states.pt", "zero_pp_rank_3_mp_rank_00_optim_states.pt",
                                       "bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt", "rng_state_rank5.pt",
                                       "run_config.yaml")] == [0, 3, 12, 5, 0]
