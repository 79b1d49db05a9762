"""`cic-gpt2 bench`: the memory arithmetic (`cic_gpt2.memory`) against hand arithmetic, and a real CPU engine
benchmark."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cic_gpt2 import memory
from cic_gpt2.perf import GIB
from conftest import run_cli, run_proc

GPT2_LARGE_PARAMS = 774_030_080  # transformer body of GPT-2-Large (Radford et al. report "774M")


@pytest.mark.parametrize("name", ["gpt2", "gpt2-large"])
def test_param_count_matches_the_real_model(name):
    from transformers import GPT2ForSequenceClassification

    from cic_gpt2.config import ModelConfig
    from cic_gpt2.model import build_hf_config

    cfg = build_hf_config(ModelConfig(name=name), ["a", "b"])
    cfg.num_labels, cfg.pad_token_id = 8, cfg.eos_token_id
    with torch.device("meta"):
        model = GPT2ForSequenceClassification(cfg)
    real = sum(p.numel() for p in model.parameters())
    assert memory.model_shape(name).param_count("seqcls", 8) == real


def test_gpt2_large_stage0_is_16_bytes_per_param():
    shape = memory.model_shape("gpt2-large")
    psi = shape.param_count("seqcls", 8)
    assert psi == GPT2_LARGE_PARAMS + 1280 * 8
    case = memory.MemoryCase(shape, world_size=1, micro_batch_size=1, seq_len=64, precision="fp16")
    est = memory.estimate(case, stage=0, offload=False, gpu_mem_gib=80)
    # 2Ψ fp16 params + 2Ψ fp16 grads + 12Ψ fp32 master/m/v = 16Ψ ≈ 12.4e9 bytes
    assert est.model_state_bytes == 16 * psi
    assert 12.3e9 < est.model_state_bytes < 12.5e9
    # the activations of 1 x 64 tokens are small next to the model states, and everything adds up
    assert est.activation_bytes == 64 * 1280 * (34 * 36 + 4) < 0.2e9
    parts = est.model_state_bytes + est.bucket_bytes + max(est.activation_bytes, est.step_transient_bytes)
    assert est.total_bytes == pytest.approx(parts * (1 + memory.FRAGMENTATION) + memory.CONTEXT_GIB * GIB)


def test_gpt2_large_on_a_16gb_v100_needs_offload():
    case = memory.MemoryCase(memory.model_shape("gpt2-large"), world_size=1, micro_batch_size=4, seq_len=128)
    plain = memory.estimate(case, 2, offload=False, gpu_mem_gib=16, reduce_bucket_size=2e8)
    offload = memory.estimate(case, 2, offload=True, gpu_mem_gib=16, reduce_bucket_size=2e8)
    assert not plain.fits and plain.total_bytes > 16 * GIB
    assert offload.fits and offload.total_bytes < 16 * GIB
    # offload moves master weights, Adam states and fp32 grads (18Ψ) to the host
    assert offload.host_bytes == 18 * case.params
    # ...and the shipped ds_configs agree: fp16 without offload does not fit, the offload one does
    by_name = {name: est for name, _, est in memory.estimate_ds_configs(case, 16)}
    assert not by_name["zero2_fp16"].fits and by_name["zero2_fp16_offload"].fits


def test_more_gpus_lower_stage2_memory_not_stage0():
    shape = memory.model_shape("gpt2-large")
    per_world = {}
    for world in (1, 2, 8):
        case = memory.MemoryCase(shape, world_size=world, micro_batch_size=4, seq_len=128)
        per_world[world] = (memory.estimate(case, 0, False, 16), memory.estimate(case, 2, False, 16))
    assert per_world[1][1].total_bytes > per_world[2][1].total_bytes > per_world[8][1].total_bytes
    assert per_world[1][0].total_bytes == per_world[8][0].total_bytes
    # stage 2 at 8 GPUs: 2Ψ + 14Ψ/8 of model states
    psi = per_world[8][1]
    assert psi.model_state_bytes == pytest.approx((2 + 14 / 8) * shape.param_count())


def test_gradient_checkpointing_shrinks_activations():
    shape = memory.model_shape("gpt2-large")
    plain = memory.MemoryCase(shape, micro_batch_size=8, seq_len=512)
    ckpt = memory.MemoryCase(shape, micro_batch_size=8, seq_len=512, gradient_checkpointing=True)
    # 34 bytes per token per hidden unit per layer (16-bit, SDPA) for 36 layers, + embeddings / final LN
    assert memory.activation_bytes(plain) == 512 * 8 * 1280 * (34 * 36 + 4)
    assert memory.activation_bytes(ckpt) < memory.activation_bytes(plain) / 10


def test_bench_memory_cli(tmp_path, capsys):
    out = tmp_path / "mem.json"
    assert run_cli("bench", "memory", "--model", "gpt2-large", "--gpu-mem", "16", "--seq-len", "128",
                   "--micro-batch", "4", "--json", out) == 0
    printed = capsys.readouterr().out
    assert "774.0M parameters" in printed and "fits 16 GiB: zero2_fp16_offload" in printed
    payload = json.loads(out.read_text())
    assert payload["fits"] == ["zero2_fp16_offload"]
    assert {s["label"] for s in payload["stages"]} >= {"stage 0", "stage 2", "stage 2 + offload"}


REPO = Path(__file__).resolve().parents[1]


def _ds_config_table(stdout: str) -> dict[str, tuple[str, str]]:
    """config -> (TOTAL, fits) as printed in the `ds_configs/` table of `bench memory`."""
    table = stdout.split("ds_configs/", 1)[1].strip().splitlines()
    head = table[1].split()
    rows = {}
    for line in table[2:]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = (cells[head.index("TOTAL")], cells[head.index("fits")])
    return rows


def test_readme_memory_figures_are_the_commands_output(capsys):
    """README's Performance row for `bench memory` names its command and table; each figure in it must be
    exactly what that command prints (TOTAL column of the ds_configs/ table, and its fits column)."""
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `bench memory`"))
    what, figure, baseline = [cell.strip() for cell in row.strip("|").split(" | ")]
    assert "TOTAL column" in what and "`ds_configs/` table" in what
    command = re.search(r"`cic-gpt2 (bench memory [^`]+)`", what).group(1).split()
    checked = 0
    for cell in (figure, baseline):
        extra = re.search(r"with `(--[^`]+)`", cell)
        argv = command + (extra.group(1).split() if extra else [])
        assert run_cli(*argv) == 0
        printed = _ds_config_table(capsys.readouterr().out)
        claims = re.findall(r"`(zero\w+)` (\d+\.\d+) GiB: (fits|does not fit)", cell)
        assert claims, cell
        for name, total, fits in claims:
            assert printed[name] == (total, "yes" if fits == "fits" else "NO"), (argv, name, printed[name])
            checked += 1
    assert checked == 3


def test_performance_doc_memory_tables_are_the_estimates():
    """docs/performance.md's two ZeRO-2 tables (micro batch 32 x 64 tokens; 1 and 4 GPUs): every figure, to
    its printed decimal, and every card list, from `memory.estimate_ds_configs`."""
    text = (REPO / "docs" / "performance.md").read_text()
    tables = {1: text.split("One GPU (`--world-size 1`)", 1)[1], 4: text.split("Four GPUs (`--world-size 4`)", 1)[1]}
    checked = 0
    for world, body in tables.items():
        lines = [ln for ln in body.strip().splitlines()[:8] if ln.startswith("| gpt2")]
        assert len(lines) == 4
        for line in lines:
            model, _, *cells, host = [c.strip() for c in line.strip("|").split("|")]
            case = memory.MemoryCase(memory.model_shape(model), world_size=world, micro_batch_size=32, seq_len=64)
            fits_on = {gib: {n: e.fits for n, _, e in memory.estimate_ds_configs(case, gib)} for gib in (16, 32, 80)}
            by_name = {n: e for n, _, e in memory.estimate_ds_configs(case, 16)}
            for name, cell in zip(("zero2_fp16", "zero2_fp16_offload", "zero2_bf16"), cells):
                cards = ", ".join(str(g) for g in (16, 32, 80) if fits_on[g][name])
                assert cell == f"{by_name[name].total_bytes / GIB:.1f} ({cards})", (world, model, name)
                checked += 1
            assert host == f"{by_name['zero2_fp16_offload'].host_bytes / GIB:.1f}", (world, model)
    assert checked == 24


def test_bench_memory_rejects_unknown_model(capsys):
    assert run_cli("bench", "memory", "--model", "gpt5-huge") == 2
    assert "gpt5-huge" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- bench train
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def _bench_train(*argv) -> subprocess.CompletedProcess:
    """`cic-gpt2 bench train` in its own process, as a user runs it (it sets up its own process group)."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    proc = run_proc([sys.executable, "-m", "cic_gpt2", "bench", "train", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_bench_train_cpu_tiny_on_prepared_lengths(prepared_v2, tmp_path):
    out = tmp_path / "bench.json"
    steps, micro, accum = 3, 4, 2
    proc = _bench_train("--data", prepared_v2, "--steps", steps, "--warmup-steps", 1, "--output", out,
                        "model.name=tiny", f"train.micro_batch_size={micro}", f"train.grad_accum={accum}")
    r = json.loads(out.read_text())
    assert "samples/s" in proc.stdout and "MFU n/a" in proc.stdout
    assert (r["device"], r["precision"], r["world_size"], r["steps"]) == ("cpu", "fp32", 1, steps)
    assert r["samples"] == steps * micro * accum  # warm-up steps are not counted
    assert 0 < r["tokens_nonpad"] <= r["tokens_padded"]
    assert r["tokens_padded"] % 8 == 0  # dynamic padding to a multiple of data.pad_to_multiple_of
    lengths = [int(n) for n in __import__("datasets").load_from_disk(str(prepared_v2 / "train"))["length"]]
    assert min(lengths) <= r["tokens_nonpad"] / r["samples"] <= max(lengths)  # real length distribution
    assert r["tokens_per_s_padded"] >= r["tokens_per_s_nonpad"] > 0 and r["samples_per_s"] > 0
    phases = r["forward_s_per_step"] + r["backward_s_per_step"] + r["optimizer_s_per_step"]
    assert min(r["forward_s_per_step"], r["backward_s_per_step"], r["optimizer_s_per_step"]) > 0
    assert phases <= r["step_time_s"]
    assert r["samples_per_s"] == pytest.approx(r["samples"] / r["wall_s"])
    # tiny: 2 layers x 64 wide; 6 x block matmul weights + attention at the mean padded length
    assert r["model_flops_per_token"] == 6 * 12 * 2 * 64**2 + 12 * 2 * 64 * round(r["mean_padded_len"])
    assert r["mfu"] is None and "cpu" in r["mfu_note"]
    assert len(r["peak_mem_gib_per_rank"]) == 1 and 0.05 < r["peak_mem_gib_per_rank"][0] < 20
    assert r["skipped_steps"] == 0


def test_bench_train_fixed_length_has_no_padding(tmp_path):
    out = tmp_path / "bench.json"
    _bench_train("--seq-len", 24, "--num-labels", 3, "--steps", 2, "--warmup-steps", 0, "--output", out,
                 "model.name=tiny", "train.micro_batch_size=2")
    r = json.loads(out.read_text())
    assert r["tokens_padded"] == r["tokens_nonpad"] == 2 * 2 * 24 and r["mean_padded_len"] == 24


def test_bench_train_needs_lengths(capsys):
    assert run_cli("bench", "train", "model.name=tiny") == 2
    assert "--seq-len" in capsys.readouterr().err
