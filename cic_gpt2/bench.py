"""`cic-gpt2 bench`: know the speed and the memory before spending the allocation.

    cic-gpt2 bench memory --model gpt2-large --gpu-mem 16 [--world-size 4] [--micro-batch 8 --seq-len 128]
        Per-GPU memory estimate for ZeRO stages 0/1/2, with and without optimizer offload, and which
        ds_configs/*.json fits. Pure arithmetic: runs anywhere, no GPU needed.

    cic-gpt2 bench train --data DIR [--steps 20 --warmup-steps 3] [--output bench.json] [key=value ...]
    torchrun --nproc-per-node 4 -m cic_gpt2 bench train --data DIR model.name=gpt2-large train.precision=bf16
        N optimizer steps of the real engine (the same builders as `cic-gpt2 train`) on synthetic token
        batches whose lengths follow the prepared split (or `--seq-len`): tokens/s (padded and non-pad),
        samples/s, forward/backward/optimizer time, MFU, peak memory per device, skipped fp16 steps.

Memory model (`bench memory`), per GPU, Ψ = parameter count, N = data-parallel world size, following
Rajbhandari et al., "ZeRO" (SC'20) and Korthikanti et al., "Reducing Activation Recomputation" (2022):
  * model states, mixed precision (fp16/bf16): 2Ψ params + 2Ψ grads + 12Ψ optimizer (fp32 master, Adam m, v);
    stage 1 partitions the 12Ψ, stage 2 also the grads: 2Ψ + (2Ψ + 12Ψ)/N. fp32: 4Ψ + 4Ψ + 8Ψ.
  * step transient: DeepSpeed upcasts this rank's gradient partition to fp32 before the Adam step (4Ψ/N).
  * gradient buckets: stage 1/2 keep `reduce_bucket_size` 16-bit elements, twice with `overlap_comm`.
  * optimizer offload (ZeRO-Offload): master weights, Adam states and fp32 grads live in pinned host memory
    (18Ψ/N bytes per rank); the GPU keeps the 16-bit params and the gradient buckets.
  * activations per layer (16-bit): s·b·h·34 bytes with SDPA attention (transformers' default, no s² score
    matrix kept); `--attention eager` adds 5·a·s²·b. Gradient checkpointing keeps 2·s·b·h per layer plus one
    layer recomputed. causal-lm adds the logits: b·s·V·10 bytes (16-bit logits + fp32 upcast + its grad).
    The peak is model states + buckets + max(activations, step transient).
  * CUDA context, cuBLAS workspaces and NCCL buffers: a fixed CONTEXT_GIB; allocator fragmentation:
    FRAGMENTATION of everything the allocator holds.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from cic_gpt2.errors import ConfigError
from cic_gpt2.files import write_text
from cic_gpt2.perf import GIB, flops_per_token, param_count, peak_flops_per_s, peak_memory_gib, precision_name

HELP = "training speed, MFU and memory benchmarks (`bench memory`, `bench train`)"

CONTEXT_GIB = 1.0
"""CUDA context (~0.3-0.5 GiB on V100/A100), cuBLAS/cuDNN workspaces and NCCL buffers, which the PyTorch
allocator does not see but the card's capacity must hold."""
FRAGMENTATION = 0.10
"""Share of allocator memory lost to fragmentation (caching allocator block rounding)."""


# --------------------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """The GPT-2 dimensions the memory and FLOPs arithmetic needs."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int

    def param_count(self, head: str = "seqcls", num_labels: int = 8) -> int:
        """Exact trainable parameters of GPT2ForSequenceClassification / GPT2LMHeadModel (tied lm_head)."""
        return param_count(self, num_labels, head)


def model_shape(name_or_path: str) -> Shape:
    """A preset name (the model module's table) or a local Hugging Face directory -> its Shape."""
    cfg = _hf_config(name_or_path)
    return Shape(name_or_path, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.n_positions)


def _hf_config(name_or_path: str):
    """The GPT2Config `cic-gpt2 train` would build for model.name=NAME (a preset or a local directory)."""
    from cic_gpt2.config import ModelConfig
    from cic_gpt2.model import build_hf_config

    return build_hf_config(ModelConfig(name=name_or_path), ["a", "b"])


# --------------------------------------------------------------------------------------------------
# bench memory
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryCase:
    """What to estimate: one model at one batch shape, precision and world size."""

    shape: Shape
    world_size: int = 1
    micro_batch_size: int = 8
    seq_len: int = 128
    precision: str = "fp16"  # fp16 | bf16 | fp32
    gradient_checkpointing: bool = False
    head: str = "seqcls"
    num_labels: int = 8
    attention: str = "sdpa"  # sdpa | eager

    @property
    def params(self) -> int:
        return self.shape.param_count(self.head, self.num_labels)


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU bytes of one ZeRO stage / offload choice (and host bytes per rank for offload)."""

    label: str
    stage: int
    offload: bool
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    step_transient_bytes: float
    bucket_bytes: float
    activation_bytes: float
    overhead_bytes: float
    host_bytes: float
    total_bytes: float
    gpu_mem_gib: float
    fits: bool = field(default=False)

    @property
    def model_state_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes


def activation_bytes(case: MemoryCase) -> float:
    """Activation memory kept for backward, per GPU (Korthikanti et al. 2022, no tensor parallelism)."""
    s, b, h, a, L = case.seq_len, case.micro_batch_size, case.shape.n_embd, case.shape.n_head, case.shape.n_layer
    width = 1.0 if case.precision in ("fp16", "bf16") else 2.0  # the 34 counts 2-byte tensors
    per_layer = s * b * h * 34 * width
    if case.attention == "eager":
        per_layer += 5 * a * s * s * b * width
    if case.gradient_checkpointing:
        layers = L * 2 * s * b * h * width + per_layer  # block inputs + one block recomputed in backward
    else:
        layers = L * per_layer
    embed_and_final_ln = 4 * s * b * h * width
    logits = case.micro_batch_size * case.seq_len * case.shape.vocab_size * 10 if case.head == "causal-lm" else 0
    return layers + embed_and_final_ln + logits


def estimate(case: MemoryCase, stage: int, offload: bool, gpu_mem_gib: float, reduce_bucket_size: float = 5e8,
             overlap_comm: bool = True, label: str = "") -> MemoryEstimate:
    """Per-GPU memory of `case` under ZeRO `stage` (0, 1, 2), optimizer offload on/off, for a card of
    `gpu_mem_gib`. See the module docstring for the model."""
    if stage not in (0, 1, 2):
        raise ConfigError(f"ZeRO stage {stage} is not estimated here (0, 1 or 2)")
    if offload and stage == 0:
        raise ConfigError("optimizer offload needs ZeRO stage 1 or 2")
    psi, n = float(case.params), float(case.world_size)
    mixed = case.precision in ("fp16", "bf16")
    weight = 2.0 if mixed else 4.0
    opt_per_param = 12.0 if mixed else 8.0  # fp32 master + Adam m + v, or just m + v in fp32
    params_b = weight * psi
    grads_b = weight * psi / (n if stage == 2 else 1)
    opt_b = opt_per_param * psi / (n if stage >= 1 else 1)
    transient_b = (4.0 * psi / (n if stage >= 1 else 1)) if mixed else 0.0
    buckets_b = 0.0 if stage == 0 else weight * reduce_bucket_size * (2 if overlap_comm else 1)
    host_b = 0.0
    if offload:
        host_b = (opt_per_param + 4.0 + weight) * psi / n  # master+Adam, fp32 grads, 16-bit copy-back buffer
        grads_b, opt_b, transient_b = 0.0, 0.0, 0.0
    act_b = activation_bytes(case)
    allocator_b = params_b + grads_b + opt_b + buckets_b + max(act_b, transient_b)
    overhead_b = CONTEXT_GIB * GIB + FRAGMENTATION * allocator_b
    total_b = allocator_b + overhead_b
    name = label or f"stage {stage}{' + offload' if offload else ''}"
    return MemoryEstimate(name, stage, offload, params_b, grads_b, opt_b, transient_b, buckets_b, act_b,
                          overhead_b, host_b, total_b, gpu_mem_gib, fits=total_b <= gpu_mem_gib * GIB)


def estimate_stages(case: MemoryCase, gpu_mem_gib: float) -> list[MemoryEstimate]:
    out = [estimate(case, 0, False, gpu_mem_gib)]
    for stage in (1, 2):
        out.append(estimate(case, stage, False, gpu_mem_gib))
        out.append(estimate(case, stage, True, gpu_mem_gib))
    return out


def estimate_ds_configs(case: MemoryCase, gpu_mem_gib: float) -> list[tuple[str, str, MemoryEstimate]]:
    """Every GPU config in ds_configs/ (its own precision, buckets, offload) -> (name, precision, estimate)."""
    from cic_gpt2 import ds_config

    rows = []
    for name in ds_config.available_configs():
        if name.startswith("zero2_cpu"):  # CPU-only configs (tests, demo)
            continue
        path = ds_config.CONFIG_DIR / f"{name}.json"
        ds = ds_config.load_ds_json(path)
        zero = ds["zero_optimization"]
        precision = ds_config.precision_of(ds)
        offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        if zero["stage"] > 2:
            continue
        est = estimate(
            replace(case, precision=precision),
            zero["stage"], offload, gpu_mem_gib,
            reduce_bucket_size=float(zero.get("reduce_bucket_size", 5e8)),
            overlap_comm=bool(zero.get("overlap_comm", False)), label=name,
        )
        rows.append((name, precision, est))
    return rows


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def memory_table(rows: list[MemoryEstimate]) -> str:
    head = ("config", "params", "grads", "optim", "step", "buckets", "activ", "overhead", "TOTAL", "host/rank", "fits")
    lines = ["{:<20}".format(head[0]) + "".join(f"{h:>10}" for h in head[1:])]
    for r in rows:
        cells = [r.params_bytes, r.grads_bytes, r.optimizer_bytes, r.step_transient_bytes, r.bucket_bytes,
                 r.activation_bytes, r.overhead_bytes, r.total_bytes, r.host_bytes]
        lines.append(f"{r.label:<20}" + "".join(f"{_gib(c):>10}" for c in cells) + f"{'yes' if r.fits else 'NO':>10}")
    return "\n".join(lines)


def run_memory(args: argparse.Namespace) -> int:
    shape = model_shape(args.model)
    seq_len, num_labels = args.seq_len, 8
    if args.data:
        from cic_gpt2.prepared import Prepared

        prepared = Prepared.load(args.data)
        num_labels = len(prepared.label_names)
        seq_len = seq_len or 8 * math.ceil(prepared.max_length / 8)
    seq_len = seq_len or 512
    case = MemoryCase(shape, args.world_size, args.micro_batch, seq_len, args.precision,
                      args.gradient_checkpointing, args.head, num_labels, args.attention)
    stages = estimate_stages(case, args.gpu_mem)
    configs = estimate_ds_configs(case, args.gpu_mem)
    print(f"{shape.name}: {case.params / 1e6:.1f}M parameters ({args.head} head), world size {args.world_size}, "
          f"micro batch {args.micro_batch} x {seq_len} tokens, {args.precision}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"{args.attention} attention; GPU {args.gpu_mem:g} GiB. Figures in GiB per GPU.")
    print("\nZeRO stages (reduce bucket 5e8, overlap_comm):")
    print(memory_table(stages))
    print("\nds_configs/ (each with its own precision and buckets):")
    print(memory_table([est for _, _, est in configs]))
    fitting = [name for name, _, est in configs if est.fits]
    preferred = [n for n, p, e in configs if e.fits and p == args.precision and not e.offload]
    preferred += [n for n, p, e in configs if e.fits and p == args.precision and e.offload]
    if preferred:
        print(f"\nfits {args.gpu_mem:g} GiB: {preferred[0]}" + (f" (also: {', '.join(n for n in fitting if n != preferred[0])})"
                                                           if len(fitting) > 1 else ""))
    elif fitting:
        print(f"\nno {args.precision} config fits {args.gpu_mem:g} GiB; these do: {', '.join(fitting)}")
    else:
        print(f"\nno ds_config fits {args.gpu_mem:g} GiB: try --gradient-checkpointing, a smaller --micro-batch, "
              "or more GPUs (--world-size)")
    if args.json:
        payload = {
            "case": {**asdict(case), "params": case.params},
            "gpu_mem_gib": args.gpu_mem, "context_gib": CONTEXT_GIB, "fragmentation": FRAGMENTATION,
            "stages": [{**asdict(e), "model_state_bytes": e.model_state_bytes} for e in stages],
            "ds_configs": [{**asdict(e), "precision": p} for _, p, e in configs],
            "fits": fitting,
        }
        _write_json(Path(args.json), payload)
    return 0


def _write_json(path: Path, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# bench train
# --------------------------------------------------------------------------------------------------
@dataclass
class PhaseTimes:
    """Seconds spent in each phase over the measured steps, this rank (synchronized on CUDA)."""

    forward_s: float = 0.0
    backward_s: float = 0.0
    optimizer_s: float = 0.0
    samples: int = 0
    tokens_padded: int = 0
    tokens_nonpad: int = 0


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_lengths(cfg, args) -> tuple[list[int], str]:
    """Example lengths to draw from: the real lengths of the prepared train split, or `--seq-len`."""
    if args.seq_len:
        return [args.seq_len], f"fixed {args.seq_len} tokens"
    if not cfg.data.path:
        raise ConfigError("bench train needs --data DIR (lengths of its train split) or --seq-len N")
    from cic_gpt2.prepared import Prepared

    lengths = [int(n) for n in Prepared.load(cfg.data.path).split("train")["length"]]
    if cfg.data.max_length:
        lengths = [min(n, cfg.data.max_length) for n in lengths]
    return lengths, f"lengths of {cfg.data.path}/train ({len(lengths)} rows, mean {sum(lengths) / len(lengths):.1f})"


def synthetic_batches(lengths: list[int], micro_batch_size: int, vocab_size: int, num_labels: int, pad_id: int,
                      data_cfg, seed: int):
    """Endless micro-batches of random token ids (never the pad/eos id) whose lengths are drawn from
    `lengths`, through the training collate (`cic_gpt2.data.collate`: same padding, same truncation)."""
    import torch

    from cic_gpt2.data import collate

    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor(lengths, dtype=torch.long)
    while True:
        batch_lengths = pool[torch.randint(len(pool), (micro_batch_size,), generator=gen)].tolist()
        ids = [torch.randint(vocab_size, (n,), generator=gen) for n in batch_lengths]
        ids = [row.masked_fill(row == pad_id, 0).tolist() for row in ids]
        labels = torch.randint(num_labels, (micro_batch_size,), generator=gen).tolist()
        batch = collate(ids, labels, list(range(micro_batch_size)), pad_id, data_cfg.max_length,
                        data_cfg.pad_to_multiple_of)
        yield {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def timed_step(engine, batches, grad_accum: int, device, times: Optional[PhaseTimes]) -> None:
    """One optimizer step (grad_accum micro-batches) with each phase timed between device syncs."""

    for _ in range(grad_accum):
        batch = next(batches)
        inputs = {k: v.to(device) for k, v in batch.items()}
        _sync(device)
        t0 = time.perf_counter()
        loss = engine(**inputs).loss
        _sync(device)
        t1 = time.perf_counter()
        engine.backward(loss)
        _sync(device)
        t2 = time.perf_counter()
        engine.step()  # the optimizer runs only at the accumulation boundary
        _sync(device)
        t3 = time.perf_counter()
        if times is not None:
            times.forward_s += t1 - t0
            times.backward_s += t2 - t1
            times.optimizer_s += t3 - t2
            mask = batch["attention_mask"]
            times.samples += mask.shape[0]
            times.tokens_padded += mask.numel()
            times.tokens_nonpad += int(mask.sum())


def run_train(args: argparse.Namespace) -> int:

    import torch

    from cic_gpt2 import dist, ds_config
    from cic_gpt2.config import RunConfig, load_config

    flags = {"data.path": args.data}
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_config(RunConfig, args.config, overrides)
    if args.steps < 1 or args.warmup_steps < 0:
        raise ConfigError("--steps must be >= 1 and --warmup-steps >= 0")
    info = dist.discover()
    ds_dict, ds_path = ds_config.load_and_build(cfg.train, info.world_size)
    lengths, lengths_source = synthetic_lengths(cfg, args)
    label_names = _label_names(cfg, args)
    dist.init(info, cfg.dist.timeout_s)
    try:
        from cic_gpt2.model import build_model
        from cic_gpt2.tokenizer import load_tokenizer
        from cic_gpt2.trainer import build_engine  # the engine exactly as `train` builds it

        device = dist.device(info)
        if args.gpu_mem_cap and device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_mem_cap * GIB / total), device)
        tokenizer = load_tokenizer(None)
        torch.manual_seed(cfg.train.seed)
        classifier = build_model(cfg.model, label_names, tokenizer)
        hf_config = classifier.hf_model.config
        engine = build_engine(cfg, classifier, ds_dict, args.warmup_steps + args.steps)
        precision = precision_name(engine)
        batches = synthetic_batches(lengths, cfg.train.micro_batch_size, hf_config.vocab_size, len(label_names),
                                    tokenizer.eos_token_id, cfg.data, cfg.train.seed + info.rank)
        from tqdm.auto import tqdm

        bar = tqdm(total=args.warmup_steps + args.steps, desc="bench", unit="step", disable=not info.is_main)
        for _ in range(args.warmup_steps):  # warm-up: allocator, kernels, loss-scale search; not measured
            timed_step(engine, batches, cfg.train.grad_accum, device, None)
            bar.update(1)
        skipped_before = engine.skipped_steps
        times = PhaseTimes()
        _sync(device)
        t_start = time.perf_counter()
        for _ in range(args.steps):
            timed_step(engine, batches, cfg.train.grad_accum, device, times)
            bar.update(1)
        _sync(device)
        wall_s = time.perf_counter() - t_start
        bar.close()
        mem_gib, mem_source = peak_memory_gib(device)
        local = {"rank": info.rank, "wall_s": wall_s, "peak_mem_gib": mem_gib, "skipped_steps": engine.skipped_steps - skipped_before,
                 **asdict(times)}
        per_rank = [local]
        if torch.distributed.is_initialized() and info.world_size > 1:
            per_rank = [None] * info.world_size
            torch.distributed.all_gather_object(per_rank, local)  # collective: every rank
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        params = param_count(hf_config, len(label_names), cfg.model.head)
        report = summarize(per_rank, cfg, args, params, info.world_size, precision, device_name, str(ds_path), lengths_source,
                           hf_config, flops_per_token, peak_flops_per_s(device_name, precision), mem_source)
        if info.is_main:
            print(format_report(report))
            if args.output:
                _write_json(Path(args.output), report)
                print(f"written: {args.output}")
        return 0
    finally:
        dist.destroy()


def _label_names(cfg, args) -> list[str]:
    if cfg.data.path and not args.seq_len:
        from cic_gpt2.prepared import Prepared

        return Prepared.load(cfg.data.path).label_names
    return [f"class_{i}" for i in range(args.num_labels)]


def summarize(per_rank: list[dict], cfg, args, params: int, world_size: int, precision: str, device_name: str, ds_path: str,
              lengths_source: str, hf_config, flops_fn, peak_flops: Optional[float], mem_source: str) -> dict:
    wall_s = max(r["wall_s"] for r in per_rank)  # the slowest rank sets the pace
    samples = sum(r["samples"] for r in per_rank)
    padded = sum(r["tokens_padded"] for r in per_rank)
    nonpad = sum(r["tokens_nonpad"] for r in per_rank)
    mean_padded_len = padded / samples
    tokens_per_s = padded / wall_s
    flops_per_token = float(flops_fn(hf_config, max(1, round(mean_padded_len))))
    mfu = flops_per_token * tokens_per_s / (peak_flops * world_size) if peak_flops else None
    steps = args.steps
    return {
        "model": cfg.model.name, "head": cfg.model.head, "params": params,
        "device": device_name, "world_size": world_size, "precision": precision, "ds_config": ds_path,
        "micro_batch_size": cfg.train.micro_batch_size, "grad_accum": cfg.train.grad_accum,
        "global_batch_size": cfg.train.micro_batch_size * cfg.train.grad_accum * world_size,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "lengths": lengths_source, "mean_padded_len": mean_padded_len,
        "warmup_steps": args.warmup_steps, "steps": steps, "wall_s": wall_s,
        "samples_per_s": samples / wall_s, "tokens_per_s_padded": tokens_per_s, "tokens_per_s_nonpad": nonpad / wall_s,
        "tokens_padded": padded, "tokens_nonpad": nonpad, "samples": samples,
        "step_time_s": wall_s / steps,
        "forward_s_per_step": max(r["forward_s"] for r in per_rank) / steps,
        "backward_s_per_step": max(r["backward_s"] for r in per_rank) / steps,
        "optimizer_s_per_step": max(r["optimizer_s"] for r in per_rank) / steps,
        "model_flops_per_token": flops_per_token, "peak_flops_per_device": peak_flops,
        "mfu": mfu, "mfu_note": None if mfu is not None else f"no peak FLOP/s known for {device_name} ({precision})",
        "peak_mem_gib_per_rank": [r["peak_mem_gib"] for r in per_rank], "peak_mem_source": mem_source,
        "skipped_steps": max(r["skipped_steps"] for r in per_rank),
    }


def format_report(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else f"n/a ({r['mfu_note']})"
    return "\n".join([
        f"{r['model']} ({r['head']}), {r['precision']}, {r['ds_config']}, {r['world_size']} x {r['device']}, "
        f"global batch {r['global_batch_size']} = {r['micro_batch_size']} x {r['grad_accum']} x {r['world_size']}",
        f"  lengths: {r['lengths']}; mean padded length {r['mean_padded_len']:.1f}",
        f"  {r['steps']} measured steps after {r['warmup_steps']} warm-up: {r['step_time_s'] * 1e3:.1f} ms/step "
        f"(forward {r['forward_s_per_step'] * 1e3:.1f}, backward {r['backward_s_per_step'] * 1e3:.1f}, "
        f"optimizer {r['optimizer_s_per_step'] * 1e3:.1f})",
        f"  samples/s {r['samples_per_s']:.1f}   tokens/s padded {r['tokens_per_s_padded']:.0f}, "
        f"non-pad {r['tokens_per_s_nonpad']:.0f}   MFU {mfu}",
        f"  peak memory per rank (GiB, {r['peak_mem_source']}): "
        + ", ".join(f"{m:.2f}" for m in r["peak_mem_gib_per_rank"]) + f"   skipped fp16 steps: {r['skipped_steps']}",
    ])


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    mem = modes.add_parser("memory", help="per-GPU memory estimate for ZeRO stages 0/1/2 and ds_configs/")
    mem.add_argument("--model", default="gpt2-large", help="preset name or local HF model directory")
    mem.add_argument("--gpu-mem", type=float, default=16.0, help="GPU memory in GiB (16: V100-16GB)")
    mem.add_argument("--world-size", type=int, default=1, help="data-parallel GPUs")
    mem.add_argument("--micro-batch", type=int, default=8, help="examples per GPU per forward")
    mem.add_argument("--seq-len", type=int, default=None, help="tokens per example (default: from --data, else 512)")
    mem.add_argument("--data", default=None, help="prepared dir: sequence length = its max length, its label count")
    mem.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16")
    mem.add_argument("--head", choices=("seqcls", "causal-lm"), default="seqcls")
    mem.add_argument("--gradient-checkpointing", action="store_true")
    mem.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa")
    mem.add_argument("--json", default=None, help="also write the estimates to this JSON file")

    tr = modes.add_parser("train", help="time N optimizer steps of the real engine on synthetic batches")
    tr.add_argument("--config", help="YAML/JSON run config, as for `cic-gpt2 train`")
    tr.add_argument("--data", help="prepared dir whose train-split lengths the synthetic batches follow (= data.path)")
    tr.add_argument("--seq-len", type=int, default=None, help="fixed example length instead of --data's lengths")
    tr.add_argument("--num-labels", type=int, default=8, help="classes when no --data is given")
    tr.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
    tr.add_argument("--warmup-steps", type=int, default=3, help="unmeasured optimizer steps first")
    tr.add_argument("--gpu-mem-cap", type=float, default=None,
                    help="GiB: cap this process's CUDA allocator (torch.cuda.set_per_process_memory_fraction), "
                         "e.g. to emulate a 16 GB V100 on a bigger GPU")
    tr.add_argument("--output", default=None, help="write the figures to this JSON file (rank 0)")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides, e.g. model.name=gpt2")


def main(args: argparse.Namespace) -> int:
    if args.mode == "memory":
        if args.world_size < 1 or args.micro_batch < 1 or args.gpu_mem <= 0:
            raise ConfigError("--world-size and --micro-batch must be >= 1 and --gpu-mem > 0")
        return run_memory(args)
    if args.mode == "train":
        return run_train(args)
    raise ConfigError(f"unknown bench mode {args.mode!r}")
