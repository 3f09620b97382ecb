#!/usr/bin/env bash
# The GPU tables of the README (bench/results/gpu/): bench_step.py on CUDA for the MiniLM
# classifier (batch 32 x 64), SmolLM2-135M (batch 8 x 256) and a 1.2 B Llama-3.2-1B-shaped
# decoder (batch 4 x 256), all from random init (step time does not depend on the weights).
# Usage: bench/run_gpu_step.sh OUT_DIR
set -u
OUT=${1:?usage: bench/run_gpu_step.sh OUT_DIR}
mkdir -p "$OUT"
run() {  # name, args...
  local name=$1; shift
  echo "== $name $(date +%T)"
  python3 bench/bench_step.py --device cuda "$@" --out "$OUT/$name.json" 2>&1 | tail -n 8
}
run minilm-fp32 --model minilm-random --dtype fp32 --batch 32 --seq 64 --reps 20 --warmup 3
run smollm2-fp32 --model smollm2-random --dtype fp32 --batch 8 --seq 256 --reps 15 --warmup 3
run smollm2-bf16 --model smollm2-random --dtype bf16 --batch 8 --seq 256 --reps 15 --warmup 3
run llama1b-bf16 --model llama-1b-random --dtype bf16 --batch 4 --seq 256 --reps 8 --warmup 2
run llama1b-fp32 --model llama-1b-random --dtype fp32 --batch 4 --seq 256 --reps 8 --warmup 2
run smollm2-bf16-memory --model smollm2-random --dtype bf16 --batch 8 --seq 256 --memory
run llama1b-bf16-memory --model llama-1b-random --dtype bf16 --batch 4 --seq 256 --memory
