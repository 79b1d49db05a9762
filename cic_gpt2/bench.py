"""`cic-gpt2 bench`: know the speed and the memory before spending the allocation.

`bench memory` prints the per-GPU estimate of `cic_gpt2.memory` for ZeRO stages 0/1/2 and each ds_configs/*.json;
`bench train` times optimizer steps of the real engine on synthetic batches (also under torchrun).
Usage, what is measured and the memory model: docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from cic_gpt2.errors import ConfigError
from cic_gpt2.files import write_text
from cic_gpt2.memory import (CONTEXT_GIB, FRAGMENTATION, MemoryCase, estimate_ds_configs, estimate_stages, memory_table,
                             model_shape)
from cic_gpt2.perf import (GIB, device_name, flops_per_token, param_count, peak_flops_per_s, peak_memory_gib,
                           precision_name)

HELP = "training speed, MFU and memory benchmarks (`bench memory`, `bench train`)"


# --------------------------------------------------------------------------------------------------
# bench memory
# --------------------------------------------------------------------------------------------------
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
        from cic_gpt2.progress import bar as tqdm  # plain lines, not \r redraws, into a log

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
        device_label = device_name(device)
        params = param_count(hf_config, len(label_names), cfg.model.head)
        report = summarize(per_rank, cfg, args, params, info.world_size, precision, device_label, str(ds_path),
                           lengths_source, hf_config, flops_per_token, peak_flops_per_s(device_label, precision),
                           mem_source)
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
