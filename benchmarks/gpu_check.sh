#!/usr/bin/env bash
# GPU readiness check: GPT-2-Large (random init, seqcls head) on ONE GPU through the real engine
# (`cic-gpt2 bench train`), sequence lengths of the compact template on the bundled real sample.
#   1. ZeRO-2 fp16   (ds_configs/zero2_fp16.json)           tokens/s, MFU, peak memory
#   2. ZeRO-2 bf16   (ds_configs/zero2_bf16.json)           tokens/s, MFU, peak memory   (goal: MFU >= 40%)
#   3. ZeRO-2 fp16 + optimizer offload (zero2_fp16_offload) with the CUDA allocator capped to emulate a
#      V100-16GB: 16 GB cards show ~15.8 GiB usable, minus ~0.8 GiB of CUDA context / cuBLAS / NCCL that the
#      allocator cap does not see -> --gpu-mem-cap 15.0 (GiB)
#   4. `cic-gpt2 bench memory` for the same shapes, to compare the estimate with the measured peaks
# Fits in 10 minutes on an A100/H100 (each run: ~1 min model build + engine init, then 5 + 20 steps).
#
# Needs: a CUDA build of torch, deepspeed, and this package installed (`pip install -e .`). No network.
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default: $OUT if set, else gpu_check_out)
# Writes OUT_DIR/{fp16,bf16,offload16}.json, memory.json and gpu_check.log; record the figures and the
# device in docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
MICRO_BATCH="${MICRO_BATCH:-32}"
STEPS="${STEPS:-20}"
mkdir -p "$OUT_DIR"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python}"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())"

DATA="$OUT_DIR/prepared"
[ -f "$DATA/manifest.json" ] || "$PY" -m cic_gpt2 prepare cic_gpt2/data/ciciot2023_v2_39feat_robotumbel_sample.csv \
    --output "$DATA" --classes 8 --template compact --seed 0 --overwrite
COMMON=(--data "$DATA" --steps "$STEPS" --warmup-steps 5 model.name=gpt2-large model.head=seqcls
        "train.micro_batch_size=$MICRO_BATCH" train.grad_accum=1)

run() {  # name, timeout seconds, args...
  local name=$1 limit=$2; shift 2
  echo "=== $name"
  timeout "$limit" "$PY" -m cic_gpt2 bench train "${COMMON[@]}" --output "$OUT_DIR/$name.json" "$@" \
    || echo "=== $name FAILED (exit $?)"
}
run fp16 180 train.precision=fp16 train.ds_config=zero2_fp16
run bf16 180 train.precision=bf16 train.ds_config=zero2_bf16
run offload16 200 train.precision=fp16 train.ds_config=zero2_fp16_offload --gpu-mem-cap 15.0

echo "=== estimate (bench memory), same shapes, 16 GiB card"
"$PY" -m cic_gpt2 bench memory --model gpt2-large --gpu-mem 16 --micro-batch "$MICRO_BATCH" --data "$DATA" \
    --json "$OUT_DIR/memory.json"
