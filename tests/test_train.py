"""`cic-gpt2 train` end to end on CPU: real DeepSpeed ZeRO-2 on gloo, real torchrun processes, the bundled
real CICIoT2023 rows (conftest's `prepared_v2`), a tiny GPT-2 built from a config.

One session-scoped 2-process run (`two_rank_run`) is inspected by several tests; the resume, batch
equivalence and 1-vs-2-rank evaluation tests each add one short run next to it.
"""
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from cic_gpt2.files import free_port
from cic_gpt2 import checkpoint as ckpt
from cic_gpt2.loggers import read_jsonl
from conftest import run_cli, run_proc

STEPS = 12
SAVE_EVERY = 6
# dropout 0 (tiny preset) and a fixed seed: runs that see the same global batches give the same losses.
COMMON = ["model.name=tiny", "model.dropout=0", f"train.max_steps={STEPS}", "train.lr=2e-3", "train.warmup_steps=2", "train.seed=7",
          "log.log_every=1", "log.progress=false", "train.eval_micro_batch_size=16"]
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")



def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in RANK_VARS}


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    proc = run_proc(cmd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}: {cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def torchrun(nproc: int, *argv, timeout: int = 300) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "cic_gpt2", "train",
                 *map(str, argv)], timeout)


def train_single(*argv, timeout: int = 300) -> subprocess.CompletedProcess:
    """No launcher at all: `cic-gpt2 train` sets up its own one-rank process group."""
    return _run([sys.executable, "-m", "cic_gpt2", "train", *map(str, argv)], timeout)


@contextmanager
def _single_process_env():
    """In-process runs export RANK/WORLD_SIZE/MASTER_* (dist.init does); leave os.environ as it was."""
    saved = dict(os.environ)
    for key in RANK_VARS:
        os.environ.pop(key, None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def train_here(*argv) -> int:
    """In this process (for runs that stop with a user error: the CLI's exit status and stderr line)."""
    with _single_process_env():
        return run_cli("train", *argv)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r}


@pytest.fixture(scope="session")
def two_rank_run(prepared_v2, tmp_path_factory) -> Path:
    """2 processes x micro-batch 2, checkpoints at steps 6 and 12, export at the end."""
    run_dir = tmp_path_factory.mktemp("train") / "two_rank"
    torchrun(2, "--data", prepared_v2, "--run-dir", run_dir, *COMMON, "train.micro_batch_size=2",
             f"checkpoint.every_steps={SAVE_EVERY}", "checkpoint.keep_last=2")
    return run_dir


@pytest.mark.slow
def test_two_rank_zero2_run_trains_and_writes_its_outputs(two_rank_run, prepared_v2):
    per_step = losses(two_rank_run)
    assert sorted(per_step) == list(range(1, STEPS + 1))
    summary = json.loads((two_rank_run / "metrics.json").read_text())
    # Step 1's loss is the untrained model's (~ln 8 for any batch: near-uniform scores); after 12 steps the
    # model knows at least the class mix, over the whole validation split.
    assert summary["val"]["loss"] < per_step[1] - 0.2, (summary["val"]["loss"], per_step)
    assert sum(per_step[s] for s in range(9, 13)) / 4 < per_step[1], per_step

    ds = json.loads((two_rank_run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 2 * 1 * 2
    assert (two_rank_run / "config.yaml").is_file()
    records = read_jsonl(two_rank_run / "metrics.jsonl")
    keys = set().union(*records)
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/loss_scale", "train/skipped_steps",
                "perf/tokens_per_s", "perf/samples_per_s", "perf/max_mem_gb", "val/loss", "val/macro_f1",
                "val/weighted_f1", "val/accuracy", "test/macro_f1"):
        assert key in keys, key
    assert list((two_rank_run / "tb").glob("events.out.tfevents.*")), "TensorBoard events"
    manifest = json.loads((prepared_v2 / "manifest.json").read_text())
    for split in ("val", "test"):
        m = summary[split]
        assert m["n"] == manifest["splits"][split]["rows"], "every row once: padding duplicates dropped"
        assert sum(map(sum, m["confusion_matrix"])) == m["n"]
        assert set(m["per_class"]) == set(manifest["label_names"])
    for png in ("loss_curve.png", "confusion_matrix.png"):
        assert (two_rank_run / png).stat().st_size > 1000
    assert (two_rank_run / "export" / "config.json").is_file()

    tags = [(step, ok) for step, _, ok in ckpt.list_checkpoints(two_rank_run / "checkpoints")]
    assert tags == [(SAVE_EVERY, True), (STEPS, True)]
    tag = two_rank_run / "checkpoints" / ckpt.tag_for(STEPS)
    for name in ("run_config.yaml", "data_manifest.json", "ds_config.json", "rng_state_rank0.pt", "rng_state_rank1.pt"):
        assert (tag / name).is_file(), name
    assert json.loads((tag / "data_manifest.json").read_text())["label_names"] == manifest["label_names"]


@pytest.mark.slow
def test_zero2_optimizer_state_is_partitioned_across_ranks(two_rank_run):
    tag = two_rank_run / "checkpoints" / ckpt.tag_for(STEPS)
    model_states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    n_params = sum(shape.numel() for group in model_states["param_shapes"] for shape in group.values())
    partitions, padding = [], 0
    for rank in (0, 1):
        optim = torch.load(tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        state = optim["optimizer_state_dict"]
        assert state["zero_stage"] == 2 and state["partition_count"] == [2] * len(state["partition_count"])
        fp32 = sum(t.numel() for t in state["single_partition_of_fp32_groups"])
        adam_m = sum(s["exp_avg"].numel() for s in state["base_optimizer_state"]["state"].values())
        assert adam_m == fp32, "Adam moments cover this rank's partition only"
        partitions.append(fp32)
        padding += sum(state["group_paddings"])  # alignment padding, on the last rank's partition
    assert all(p < 0.51 * n_params for p in partitions), (partitions, n_params)
    assert sum(partitions) - padding == n_params, "the two partitions together hold every parameter once"


@pytest.mark.slow
def test_export_predicts_what_the_live_engine_predicted(two_rank_run, prepared_v2):
    """The HF export written at the end, reloaded with from_pretrained, gives the validation predictions the
    engine gave during training (same confusion matrix)."""
    from cic_gpt2.exported import Export
    from cic_gpt2.inference import pad_id_of, score_rows
    from cic_gpt2.metrics import classification_metrics
    from cic_gpt2.prepared import Prepared

    export = Export.open(two_rank_run / "export")
    classifier, tokenizer = export.load()
    val = Prepared.load(prepared_v2).table("val")
    scores = score_rows(classifier, val.column("input_ids"), 32, "cpu", pad_id_of(tokenizer))
    exported = classification_metrics(val.column("label").to_numpy(), scores.argmax(axis=1), export.label_names)
    live = json.loads((two_rank_run / "metrics.json").read_text())["val"]
    assert exported["confusion_matrix"] == live["confusion_matrix"]


@pytest.mark.slow
def test_resume_from_latest_complete_checkpoint_equals_the_uninterrupted_run(two_rank_run, prepared_v2, tmp_path):
    """A run stopped after step 6 (its step-6 checkpoint, plus a half-written step-9 save that must be ignored)
    continues under `--resume auto` and logs the same losses as the run that never stopped."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(two_rank_run / "checkpoints" / ckpt.tag_for(SAVE_EVERY), run_dir / "checkpoints" / ckpt.tag_for(SAVE_EVERY))
    partial = run_dir / "checkpoints" / ckpt.tag_for(9)
    shutil.copytree(two_rank_run / "checkpoints" / ckpt.tag_for(STEPS), partial, ignore=shutil.ignore_patterns("universal"))
    (partial / ckpt.COMPLETE_MARKER).unlink()
    proc = torchrun(2, "--data", prepared_v2, "--run-dir", run_dir, "--resume", "auto", *COMMON,
                    "train.micro_batch_size=2", f"checkpoint.every_steps={SAVE_EVERY}", "checkpoint.export=false")
    assert f"resumed from {run_dir / 'checkpoints' / ckpt.tag_for(SAVE_EVERY)}" in proc.stdout + proc.stderr
    resumed, reference = losses(run_dir), losses(two_rank_run)
    later = list(range(SAVE_EVERY + 1, STEPS + 1))
    assert sorted(resumed) == later
    assert [resumed[s] for s in later] == [reference[s] for s in later], "bitwise equal on CPU"
    assert ckpt.latest_complete(run_dir / "checkpoints") == run_dir / "checkpoints" / ckpt.tag_for(STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("micro, accum", [(4, 1), (1, 4)])
def test_same_global_batch_gives_the_same_losses(two_rank_run, prepared_v2, tmp_path, micro, accum):
    """micro 4 x accumulation 1 == micro 1 x accumulation 4 == 2 ranks x micro 2 (float tolerance)."""
    run_dir = tmp_path / f"m{micro}a{accum}"
    train_single("--data", prepared_v2, "--run-dir", run_dir, *COMMON, f"train.micro_batch_size={micro}",
                 f"train.grad_accum={accum}", "checkpoint.export=false")
    got, reference = losses(run_dir), losses(two_rank_run)
    assert sorted(got) == sorted(reference)
    for step in reference:
        assert got[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5), step


@pytest.mark.slow
def test_class_weights_and_balanced_sampler_on_two_ranks_equal_one_rank_accumulating(prepared_v2, tmp_path):
    """train.class_weights=balanced with data.sampler=balanced: a 2-process gloo run finishes, and one process
    with micro 1 x accumulation 4 sees the same global batches and gives the same (weighted) losses."""
    imbalance = ["train.class_weights=balanced", "data.sampler=balanced", "checkpoint.export=false"]
    two, one = tmp_path / "two_ranks", tmp_path / "one_rank"
    torchrun(2, "--data", prepared_v2, "--run-dir", two, *COMMON, *imbalance, "train.micro_batch_size=2")
    train_single("--data", prepared_v2, "--run-dir", one, *COMMON, *imbalance, "train.micro_batch_size=1",
                 "train.grad_accum=4")
    got, reference = losses(one), losses(two)
    assert sorted(reference) == list(range(1, STEPS + 1)) and sorted(got) == sorted(reference)
    for step in reference:
        assert got[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5), step
    summary = json.loads((two / "metrics.json").read_text())
    assert summary["test"]["n"] == json.loads((prepared_v2 / "manifest.json").read_text())["splits"]["test"]["rows"]
    resolved = (two / "config.yaml").read_text()
    assert "class_weights: balanced" in resolved and "sampler: balanced" in resolved


@pytest.mark.slow
def test_one_rank_evaluation_of_two_rank_weights_is_identical(two_rank_run, prepared_v2, tmp_path):
    """One process loads the 2-rank final checkpoint (resharded through DeepSpeed's universal format; global
    batch kept at 4 via grad_accum 2) and evaluates without training: same predictions, same metrics."""
    run_dir = tmp_path / "one_rank_eval"
    train_single("--data", prepared_v2, "--run-dir", run_dir, "--resume", two_rank_run / "checkpoints" / ckpt.tag_for(STEPS),
                 *COMMON, "train.micro_batch_size=2", "train.grad_accum=2", "checkpoint.export=false")
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, two_rank_run))
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["step"] == two["step"] == STEPS
    for split in ("val", "test"):
        for key in ("confusion_matrix", "accuracy", "macro_f1", "weighted_f1", "per_class", "n"):
            assert one[split][key] == two[split][key], (split, key)
        assert one[split]["loss"] == pytest.approx(two[split]["loss"], rel=1e-6)


@pytest.mark.slow
def test_causal_lm_head_trains_and_predicts(prepared_v2, tmp_path):
    run_dir = tmp_path / "causal"
    train_single("--data", prepared_v2, "--run-dir", run_dir, "model.name=tiny", "model.head=causal-lm",
                 "train.max_steps=12", "train.lr=3e-3", "train.warmup_steps=2", "train.micro_batch_size=8",
                 "log.log_every=1", "log.progress=false", "checkpoint.export=false")
    per_step = losses(run_dir)
    assert per_step[12] < per_step[1], per_step
    test = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert test["n"] > 0 and sum(map(sum, test["confusion_matrix"])) == test["n"]
    assert 0.0 <= test["macro_f1"] <= 1.0


def _prepared_copy(prepared_v2: Path, tmp_path: Path, **manifest_changes) -> Path:
    copy = tmp_path / "prepared"
    shutil.copytree(prepared_v2, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for dotted, value in manifest_changes.items():
        node = manifest
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_mismatched_tokenizer_fingerprint_is_refused(prepared_v2, tmp_path, capsys):
    bad = _prepared_copy(prepared_v2, tmp_path, tokenizer__fingerprint="0123456789abcdef")
    assert train_here("--data", bad, "--run-dir", tmp_path / "run", *COMMON) == 2
    err = capsys.readouterr().err
    model_fingerprint = json.loads((prepared_v2 / "manifest.json").read_text())["tokenizer"]["fingerprint"]
    assert "0123456789abcdef" in err and model_fingerprint in err, "names both tokenizers"
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.ds_config=no_such_config"], "train.ds_config='no_such_config'"),
        (["train.lrr=1"], "unknown config key train.lrr"),
        (["train.precision=fp16"], "fp16"),
        (["train.micro_batch_size=100000"], "train.micro_batch_size"),
        (["train.precision=bf16", "train.ds_config=zero2_cpu"], "train.precision=bf16"),
    ],
)
def test_config_errors_name_the_key(prepared_v2, tmp_path, capsys, overrides, expected):
    if "train.precision=fp16" in overrides:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().is_fp16_supported() or torch.cuda.is_available():
            pytest.skip("this device supports fp16")
    assert train_here("--data", prepared_v2, "--run-dir", tmp_path / "run", *COMMON, *overrides) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_missing_data_and_occupied_run_dir_are_refused(two_rank_run, prepared_v2, tmp_path, capsys):
    assert train_here("--run-dir", tmp_path / "run", *COMMON) == 2
    assert "data.path" in capsys.readouterr().err
    assert train_here("--data", prepared_v2, "--run-dir", two_rank_run, *COMMON) == 2
    assert "--resume auto" in capsys.readouterr().err


def test_fp16_overflow_steps_are_counted_and_stop_the_run(prepared_v2, tmp_path, capsys):
    """An absurd initial loss scale makes every step overflow; after train.max_skipped_steps the run stops
    with advice. Needs an fp16-capable device (CUDA): DeepSpeed's CPU accelerator here has no fp16."""
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        pytest.skip("DeepSpeed reports no fp16 support on this accelerator (CPU): fp16 runs need a GPU")
    ds = json.loads((Path(__file__).resolve().parent.parent / "ds_configs" / "zero2_fp16.json").read_text())
    # 2**40 overflows fp16 (max 65504) yet fits int64: DeepSpeed multiplies the loss by the scale as a Python int
    ds["fp16"].update(initial_scale_power=40, min_loss_scale=2**30, hysteresis=1)
    path = tmp_path / "overflowing_fp16.json"
    path.write_text(json.dumps(ds))
    rc = train_here("--data", prepared_v2, "--run-dir", tmp_path / "run", *COMMON, f"train.ds_config={path}",
                    "train.max_skipped_steps=3")
    assert rc == 2
    err = capsys.readouterr().err
    assert "3 optimizer steps in a row were skipped" in err and "train.lr" in err


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    """`cic-gpt2 demo` end to end (prepare -> 2-process train -> test metrics -> export), shortened to a few
    steps; the real demo's quality is reported in the README, not asserted here."""
    out = tmp_path / "demo"
    proc = run_proc([sys.executable, "-m", "cic_gpt2", "demo", "--out-dir", str(out), "--no-baseline",
                           "train.max_steps=3", "train.eval_every=0", "checkpoint.every_steps=0", "log.log_every=1"],
                          env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "macro_f1" in proc.stdout and "tensorboard --logdir" in proc.stdout
    summary = json.loads((out / "run" / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 3
    assert (out / "run" / "export" / "config.json").is_file()
    assert (out / "run" / "confusion_matrix.png").is_file() and (out / "prepared" / "manifest.json").is_file()
    # the shipped recipe on the template it was chosen for, with the user's overrides on top
    import yaml
    run_config = yaml.safe_load((out / "run" / "config.yaml").read_text())
    assert run_config["train"]["epochs"] == 16 and run_config["model"]["dropout"] == 0.2
    assert run_config["train"]["max_steps"] == 3
    assert json.loads((out / "prepared" / "manifest.json").read_text())["template"] == "binned"


def test_deepspeed_min_loss_scale_error_becomes_the_guards_advice(prepared_v2, tmp_path, capsys):
    """With the shipped fp16 config DeepSpeed raises a bare Exception at the 18th overflow in a row, before
    the trainer's 50-step guard: the run must still stop with the guard's one-line advice. Needs fp16 (CUDA);
    the CPU half of this is tests/test_ds_config.py::test_shipped_fp16_scalers_stop_at_the_18th_overflow..."""
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        pytest.skip("DeepSpeed reports no fp16 support on this accelerator (CPU): fp16 runs need a GPU")
    ds = json.loads((Path(__file__).resolve().parent.parent / "ds_configs" / "zero2_fp16.json").read_text())
    ds["fp16"].update(initial_scale_power=40, min_loss_scale=2**38, hysteresis=1)  # at the minimum after 2
    path = tmp_path / "overflowing_fp16.json"
    path.write_text(json.dumps(ds))
    rc = train_here("--data", prepared_v2, "--run-dir", tmp_path / "run", *COMMON, f"train.ds_config={path}")
    assert rc == 2
    err = capsys.readouterr().err
    assert "DeepSpeed stopped the run: a step was skipped at the minimum loss scale" in err and "train.lr" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_bf16_with_fp32_gradient_accumulation_trains_on_the_real_engine(prepared_v2, tmp_path):
    """The shipped 16-bit configs accumulate gradients in fp32 (data_types.grad_accum_dtype): the CPU bf16
    config runs the same ZeRO-2 path on 2 gloo ranks with 2 accumulation steps and the loss goes down."""
    run_dir = tmp_path / "bf16"
    torchrun(2, "--data", prepared_v2, "--run-dir", run_dir, *COMMON, "train.micro_batch_size=2",
             "train.grad_accum=2", "train.precision=bf16", "train.ds_config=zero2_cpu_bf16")
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] and ds["data_types"]["grad_accum_dtype"] == "fp32"
    per_step = losses(run_dir)
    assert sorted(per_step) == list(range(1, STEPS + 1))
    assert all(v == v and v < 10 for v in per_step.values()), per_step  # finite
    assert sum(per_step[s] for s in range(9, 13)) / 4 < per_step[1], per_step


@pytest.mark.slow
def test_logged_lr_is_the_engines_and_follows_the_schedule(two_rank_run):
    """train/lr is read from the engine before each step: with no skipped steps it is the run config's warmup
    + decay schedule at that step (so after fp16 skips it shows the LR really used, not the step's)."""
    from cic_gpt2.config import TrainConfig
    from cic_gpt2.ds_config import lr_ratio

    tr = TrainConfig()
    logged = {r["step"]: r["train/lr"] for r in read_jsonl(two_rank_run / "metrics.jsonl") if "train/lr" in r}
    assert sorted(logged) == list(range(1, STEPS + 1))
    for step, lr in logged.items():
        assert lr == pytest.approx(2e-3 * lr_ratio(step - 1, STEPS, 2, tr.schedule, tr.min_lr_ratio), rel=1e-6), step
