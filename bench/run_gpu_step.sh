#!/usr/bin/env bash
# The GPU step tables: bench_step.py on CUDA, every setup of a table interleaved in one run,
# from random init (step time does not depend on the weights' values).
#   headline: a 1.2 B Llama-3.2-1B-shaped decoder, bf16, batch 4 x 512, LoRA r=8's parameter
#             count: floor / full / LoRA / entry mask (sparse) / tile16 / tile32, then memory;
#   the same on SmolLM2-135M (bf16, 8 x 256) and, if it fits, an 8 B Llama-3-8B shape (no full
#   fine-tuning: its fp32 AdamW state alone would not fit beside the others);
#   the 1 B table again under torch.compile(mode="reduce-overhead") (CUDA graphs of the static
#   step; tile masks take the entry SDDMM path there); the earlier MiniLM / fp32 tables
#   (README) and the optional test groups on the GPU.
# Usage: bench/run_gpu_step.sh OUT_DIR [quick]   ("quick": only the 1 B tables and the tests)
set -u
OUT=${1:?usage: bench/run_gpu_step.sh OUT_DIR [quick]}
QUICK=${2:-}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."  # the repository root: its own sparseft, not an installed one
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
SETUPS=floor,full,lora,sparse,tile16,tile32
run() {  # name, args...
  local name=$1; shift
  echo "== $name $(date +%T)"
  python3 bench/bench_step.py --device cuda "$@" --out "$OUT/$name.json" 2>&1 | tail -n 20
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
run llama1b-bf16-4x512 --model llama-1b-random --dtype bf16 --batch 4 --seq 512 --reps 10 --warmup 3 --setups $SETUPS
run llama1b-bf16-4x512-memory --model llama-1b-random --dtype bf16 --batch 4 --seq 512 --memory --setups $SETUPS
echo "== tests $(date +%T)"
python3 -m pytest -q tests/test_cuda.py 2>&1 | tail -n 3
SPARSEFT_TRITON_CUDA=1 python3 -m pytest -q tests/test_triton.py 2>&1 | tail -n 3
[ "$QUICK" = quick ] && exit 0
run llama1b-bf16-4x512-cudagraphs --model llama-1b-random --dtype bf16 --batch 4 --seq 512 --reps 10 --warmup 4 \
  --setups floor,lora,sparse,tile16 --compile reduce-overhead
run smollm2-bf16-8x256 --model smollm2-random --dtype bf16 --batch 8 --seq 256 --reps 15 --warmup 3 --setups $SETUPS
run smollm2-bf16-8x256-memory --model smollm2-random --dtype bf16 --batch 8 --seq 256 --memory --setups $SETUPS
run llama8b-bf16-4x512 --model llama-8b-random --dtype bf16 --batch 4 --seq 512 --reps 6 --warmup 2 \
  --setups floor,lora,sparse,tile16
run minilm-fp32 --model minilm-random --dtype fp32 --batch 32 --seq 64 --reps 20 --warmup 3 --setups $SETUPS
run llama1b-fp32-4x256 --model llama-1b-random --dtype fp32 --batch 4 --seq 256 --reps 8 --warmup 2 --setups $SETUPS
