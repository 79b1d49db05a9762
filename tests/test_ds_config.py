"""ds_configs/*.json hold engine knobs only; the run config fills batch/optimizer/clipping into a new dict."""
import copy
import json

import pytest

from cic_gpt2 import ds_config as dsc
from cic_gpt2.config import TrainConfig, load_config, RunConfig
from cic_gpt2.errors import ConfigError

CPU = dsc.DeviceCaps("cpu", "cpu", fp16=False, bf16=True)
V100 = dsc.DeviceCaps("cuda", "Tesla V100-SXM2-16GB", fp16=True, bf16=False)
A100 = dsc.DeviceCaps("cuda", "NVIDIA A100-SXM4-80GB", fp16=True, bf16=True)


@pytest.mark.parametrize("name", dsc.available_configs())
def test_every_shipped_config_loads_and_keeps_to_engine_knobs(name):
    path = dsc.CONFIG_DIR / f"{name}.json"
    raw = json.loads(path.read_text())
    ds = dsc.load_ds_json(path)
    assert ds["zero_optimization"]["stage"] == 2, "the product is ZeRO-2"
    assert not set(raw) & set(dsc.RUN_CONFIG_KEYS), "batch/optimizer/clipping belong to the run config"
    precision = dsc.precision_of(ds)
    assert precision in ("fp16", "bf16", "fp32")
    if precision == "fp16":
        assert ds["fp16"]["loss_scale"] == 0, "fp16 configs use dynamic loss scaling"
    device = A100 if name.startswith("zero2_") and "cpu" not in name else CPU
    built = dsc.build_ds_config(ds, TrainConfig(micro_batch_size=3, grad_accum=5), world_size=4, device=device)
    assert built["train_batch_size"] == 3 * 5 * 4


def test_expected_configs_are_shipped():
    assert {"zero2_fp16", "zero2_bf16", "zero2_fp16_offload", "zero2_cpu", "zero2_cpu_bf16"} <= set(dsc.available_configs())
    offload = dsc.load_ds_json(dsc.CONFIG_DIR / "zero2_fp16_offload.json")
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_build_fills_a_new_dict_from_the_run_config():
    base = dsc.load_ds_json(dsc.CONFIG_DIR / "zero2_cpu.json")
    before = copy.deepcopy(base)
    train = TrainConfig(micro_batch_size=4, grad_accum=2, lr=3e-4, weight_decay=0.05, grad_clip=0.5)
    ds = dsc.build_ds_config(base, train, world_size=2, device=CPU)
    assert base == before, "the loaded JSON is never mutated"
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.05
    assert ds["optimizer"]["params"]["torch_adam"] is True, "CPU uses torch AdamW"
    on_gpu = dsc.build_ds_config(dsc.load_ds_json(dsc.CONFIG_DIR / "zero2_bf16.json"), train, 8, A100)
    assert "torch_adam" not in on_gpu["optimizer"]["params"], "CUDA uses DeepSpeed's FusedAdam"


@pytest.mark.parametrize(
    "device, precision, expected",
    [(CPU, "auto", "zero2_cpu"), (CPU, "fp32", "zero2_cpu"), (CPU, "bf16", "zero2_cpu_bf16"),
     (V100, "auto", "zero2_fp16"), (A100, "auto", "zero2_bf16"), (A100, "fp16", "zero2_fp16"),
     (A100, "fp32", "zero2_fp32")],
)
def test_auto_picks_by_precision_and_device(device, precision, expected):
    assert dsc.resolve_ds_config_path("auto", precision, device).stem == expected


def test_fp16_on_this_kind_of_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="fp16"):
        dsc.resolve_ds_config_path("auto", "fp16", CPU)
    with pytest.raises(ConfigError, match="fp16"):
        dsc.build_ds_config(dsc.load_ds_json(dsc.CONFIG_DIR / "zero2_fp16.json"), TrainConfig(), 1, CPU)


def test_bf16_on_v100_and_offload_on_cpu_are_refused():
    with pytest.raises(ConfigError, match="bf16"):
        dsc.build_ds_config(dsc.load_ds_json(dsc.CONFIG_DIR / "zero2_bf16.json"), TrainConfig(), 1, V100)
    with pytest.raises(ConfigError, match="CUDA"):
        dsc.build_ds_config(dsc.load_ds_json(dsc.CONFIG_DIR / "zero2_fp16_offload.json"), TrainConfig(), 1,
                            dsc.DeviceCaps("cpu", "cpu", fp16=True, bf16=True))


def test_precision_that_contradicts_the_json_names_both():
    base = dsc.load_ds_json(dsc.CONFIG_DIR / "zero2_cpu.json")
    with pytest.raises(ConfigError, match="train.precision=bf16.*fp32"):
        dsc.build_ds_config(base, TrainConfig(precision="bf16"), 1, CPU)


def test_missing_invalid_and_overreaching_json_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no-such-config.*available"):
        dsc.resolve_ds_config_path("no-such-config", "auto", CPU)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json.*not valid JSON"):
        dsc.load_ds_json(bad)
    owns_batch = tmp_path / "batch.json"
    owns_batch.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 64}))
    with pytest.raises(ConfigError, match="train_batch_size.*train.micro_batch_size"):
        dsc.load_ds_json(owns_batch)
    no_zero = tmp_path / "nozero.json"
    no_zero.write_text(json.dumps({"fp16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        dsc.load_ds_json(no_zero)
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}, "bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="both fp16 and bf16"):
        dsc.load_ds_json(both)


def test_a_path_outside_ds_configs_works(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    cfg = load_config(RunConfig, None, [f"train.ds_config={mine}"])
    ds, path = dsc.load_and_build(cfg.train, world_size=1, device=CPU)
    assert path == mine and ds["zero_optimization"]["stage"] == 1


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    total, warmup = 20, 4
    ratios = [dsc.lr_ratio(s, total, warmup, "cosine", 0.1) for s in range(total)]
    assert ratios[:4] == [0.25, 0.5, 0.75, 1.0]
    assert ratios[4] == pytest.approx(1.0) and ratios[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(ratios[4:], ratios[5:])), "monotone decay after warmup"
    linear = [dsc.lr_ratio(s, total, 0, "linear", 0.0) for s in range(total)]
    assert linear[0] == 1.0 and linear[-1] == pytest.approx(0.0)
    assert {dsc.lr_ratio(s, total, 2, "constant", 0.1) for s in range(2, total)} == {1.0}


SIXTEEN_BIT = ("zero2_fp16", "zero2_fp16_offload", "zero2_bf16", "zero2_cpu_bf16")


@pytest.mark.parametrize("name", SIXTEEN_BIT)
def test_sixteen_bit_configs_accumulate_gradients_in_fp32(name):
    """ZeRO-2 would otherwise accumulate (and reduce) gradients in fp16/bf16; DeepSpeed's own parser takes it."""
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig, DtypeEnum

    ds = dsc.load_ds_json(dsc.CONFIG_DIR / f"{name}.json")
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    parsed = DeepSpeedConfig(dict(ds, train_batch_size=1, train_micro_batch_size_per_gpu=1,
                                  gradient_accumulation_steps=1))
    assert parsed.grad_accum_dtype is not None and parsed.zero_optimization_stage == 2
    assert DtypeEnum(parsed.grad_accum_dtype).value == torch.float32


def test_gpu_bf16_buckets_stay_under_one_gigabyte():
    """reduce_bucket_size x 2 bytes, double-buffered with overlap_comm: 5e8 was 2.0 GB of buckets."""
    zero = dsc.load_ds_json(dsc.CONFIG_DIR / "zero2_bf16.json")["zero_optimization"]
    assert zero["overlap_comm"] and zero["reduce_bucket_size"] * 2 * 2 <= 0.8e9


@pytest.mark.parametrize("name", ("zero2_fp16", "zero2_fp16_offload"))
def test_shipped_fp16_scalers_stop_at_the_18th_overflow_and_the_trainer_gives_advice(name, monkeypatch):
    """DeepSpeed's real DynamicLossScaler, built from the shipped config by DeepSpeed's parser, raises a bare
    Exception at the 18th consecutive overflow (2**16 down to 1 with hysteresis 2) -- before the trainer's
    default 50-step guard. SkipGuard.engine_step turns exactly that into TrainingStopped with the advice, and
    lets any other exception through unchanged."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.fp16 import loss_scaler

    from cic_gpt2.config import TrainConfig
    from cic_gpt2.trainer import SkipGuard, TrainingStopped

    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda: 0)  # only its overflow log line asks
    ds = dsc.load_ds_json(dsc.CONFIG_DIR / f"{name}.json")
    parsed = DeepSpeedConfig(dict(ds, train_batch_size=1, train_micro_batch_size_per_gpu=1,
                                  gradient_accumulation_steps=1))
    scaler = loss_scaler.DynamicLossScaler(**parsed.float16_config.dynamic_loss_scale_args())

    class OverflowingEngine:  # every step overflows; the scaler reacts as inside DeepSpeed's optimizer.step()
        def step(self):
            scaler.update_scale(True)

    guard = SkipGuard(TrainConfig().max_skipped_steps)
    engine = OverflowingEngine()
    with pytest.raises(TrainingStopped) as e:
        for step in range(1, 100):
            SkipGuard.engine_step(engine, step, scaler.cur_scale)
            guard.update(1, step, scaler.cur_scale)
    assert step == 18 < TrainConfig().max_skipped_steps
    assert "at the minimum loss scale for fp16 overflow (step 18, loss scale 1)" in str(e.value) and "train.lr" in str(e.value)

    class Broken:
        def step(self):
            raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        SkipGuard.engine_step(Broken(), 1, 1.0)
