"""Per-GPU memory model of GPT-2 training under ZeRO stages 0/1/2, with and without optimizer offload, and
which ds_configs/*.json fits a card. Pure arithmetic, no GPU needed; used by `cic-gpt2 bench memory`.
The model, its sources and hand checks: docs/performance.md ("`cic-gpt2 bench memory`: the model")."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from cic_gpt2.errors import ConfigError
from cic_gpt2.perf import GIB, param_count

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
# Estimates
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
             overlap_comm: bool = True, label: str = "", fp32_grad_accum: bool = False) -> MemoryEstimate:
    """Per-GPU memory of `case` under ZeRO `stage` (0, 1, 2), optimizer offload on/off, for a card of
    `gpu_mem_gib`; `fp32_grad_accum` (ds_config `data_types.grad_accum_dtype: fp32`) keeps the accumulated
    gradients in 4 bytes a parameter. The model: docs/performance.md."""
    if stage not in (0, 1, 2):
        raise ConfigError(f"ZeRO stage {stage} is not estimated here (0, 1 or 2)")
    if offload and stage == 0:
        raise ConfigError("optimizer offload needs ZeRO stage 1 or 2")
    psi, n = float(case.params), float(case.world_size)
    mixed = case.precision in ("fp16", "bf16")
    weight = 2.0 if mixed else 4.0
    opt_per_param = 12.0 if mixed else 8.0  # fp32 master + Adam m + v, or just m + v in fp32
    params_b = weight * psi
    grads_b = (4.0 if fp32_grad_accum else weight) * psi / (n if stage == 2 else 1)
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
    """Stage 0, then stages 1 and 2 each without and with optimizer offload (default buckets, overlap_comm)."""
    out = [estimate(case, 0, False, gpu_mem_gib)]
    for stage in (1, 2):
        out.append(estimate(case, stage, False, gpu_mem_gib))
        out.append(estimate(case, stage, True, gpu_mem_gib))
    return out


def estimate_ds(case: MemoryCase, ds: dict, gpu_mem_gib: float, label: str = "") -> MemoryEstimate:
    """`case` under one DeepSpeed dict (its precision, ZeRO stage, offload, buckets, fp32 accumulation)."""
    from cic_gpt2 import ds_config

    zero = ds["zero_optimization"]
    offload = ds_config.offload_device(ds) != "none"
    return estimate(
        replace(case, precision=ds_config.precision_of(ds)),
        zero["stage"], offload, gpu_mem_gib,
        reduce_bucket_size=float(zero.get("reduce_bucket_size", 5e8)),
        overlap_comm=bool(zero.get("overlap_comm", False)), label=label,
        fp32_grad_accum=ds.get("data_types", {}).get("grad_accum_dtype") == "fp32",
    )


def estimate_ds_configs(case: MemoryCase, gpu_mem_gib: float) -> list[tuple[str, str, MemoryEstimate]]:
    """Every GPU config in ds_configs/ (its own precision, buckets, offload) -> (name, precision, estimate)."""
    from cic_gpt2 import ds_config

    rows = []
    for name in ds_config.available_configs():
        if name.startswith("zero2_cpu"):  # CPU-only configs (tests, demo)
            continue
        ds = ds_config.load_ds_json(ds_config.CONFIG_DIR / f"{name}.json")
        if ds["zero_optimization"]["stage"] > 2:
            continue
        rows.append((name, ds_config.precision_of(ds), estimate_ds(case, ds, gpu_mem_gib, label=name)))
    return rows


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def memory_table(rows: list[MemoryEstimate]) -> str:
    """A fixed-width table of the estimates, one row each, figures in GiB."""
    head = ("config", "params", "grads", "optim", "step", "buckets", "activ", "overhead", "TOTAL", "host/rank", "fits")
    lines = ["{:<20}".format(head[0]) + "".join(f"{h:>10}" for h in head[1:])]
    for r in rows:
        cells = [r.params_bytes, r.grads_bytes, r.optimizer_bytes, r.step_transient_bytes, r.bucket_bytes,
                 r.activation_bytes, r.overhead_bytes, r.total_bytes, r.host_bytes]
        lines.append(f"{r.label:<20}" + "".join(f"{_gib(c):>10}" for c in cells) + f"{'yes' if r.fits else 'NO':>10}")
    return "\n".join(lines)
