"""Performance arithmetic shared by `train` and `bench`: peak FLOP/s, FLOPs per token, parameter count,
peak memory and the precision an engine runs in. MFU conventions: docs/performance.md."""
from __future__ import annotations

import resource
from typing import Optional

GIB = 2**30

# Dense peak FLOP/s per GPU for MFU (vendor datasheets; H100/H200 SXM; fp32 = non-tensor-core).
PEAK_FLOPS = {
    "V100": {"fp16": 125e12, "bf16": None, "fp32": 15.7e12},
    "A100": {"fp16": 312e12, "bf16": 312e12, "fp32": 19.5e12},
    "H100": {"fp16": 989e12, "bf16": 989e12, "fp32": 67e12},
    "H200": {"fp16": 989e12, "bf16": 989e12, "fp32": 67e12},
}


def peak_flops_per_s(device_name: str, precision: str) -> Optional[float]:
    """Peak of one device from PEAK_FLOPS, None when unknown (CPU, other GPUs): MFU is then not reported."""
    for key, peaks in PEAK_FLOPS.items():
        if key in device_name.upper():
            return peaks.get(precision)
    return None


def flops_per_token(hf_config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM / nanoGPT convention: 6*N + 12*n_layer*n_embd*seq_len,
    N = the transformer blocks' matmul weights (12*n_layer*n_embd^2). Embedding lookups are no FLOPs; the
    classification head (seqcls) and the few LM-head positions (causal-lm) are negligible and not counted."""
    n_layer, n_embd = hf_config.n_layer, hf_config.n_embd
    n_matmul = 12 * n_layer * n_embd ** 2
    return float(6 * n_matmul + 12 * n_layer * n_embd * seq_len)


def param_count(hf_config, num_labels: int, head: str) -> int:
    """Trainable parameters of the classifier `model.build_model` builds, from its GPT-2 dimensions alone
    (a GPT2Config or anything with n_layer, n_embd, vocab_size, n_positions[, n_inner]): embeddings + blocks +
    final LayerNorm + the head (seqcls: a bias-free score layer; causal-lm: the LM head is tied to the token
    embedding, no new parameters)."""
    d, n_layer = hf_config.n_embd, hf_config.n_layer
    inner = getattr(hf_config, "n_inner", None) or 4 * d
    block = (2 * 2 * d  # ln_1, ln_2
             + d * 3 * d + 3 * d + d * d + d  # attention c_attn, c_proj
             + d * inner + inner + inner * d + d)  # mlp c_fc, c_proj
    body = hf_config.vocab_size * d + hf_config.n_positions * d + n_layer * block + 2 * d
    return body + (num_labels * d if head == "seqcls" else 0)


def peak_memory_gib(device) -> tuple[float, str]:
    """(peak memory of this process on `device` in GiB, what was measured): CUDA allocator peak, or peak RSS."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, "peak RSS"


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if getattr(device, "type", str(device)) == "cuda" else "cpu"


def precision_name(engine) -> str:
    """fp16 | bf16 | fp32: what a DeepSpeed engine computes in."""
    return "fp16" if engine.fp16_enabled() else "bf16" if engine.bfloat16_enabled() else "fp32"
