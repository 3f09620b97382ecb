#!/usr/bin/env bash
# The GPU rows of bench/results/gpu/: bench_step.py on CUDA, fp32 and bf16, for the MiniLM
# classifier (batch 32 x 64), SmolLM2-135M (batch 8 x 256) and a 1.2 B Llama-3.2-1B-shaped
# decoder (batch 4 x 256), all from random init (step time does not depend on the weights).
# Usage: bench/run_gpu_step.sh OUT_DIR
set -u
OUT=${1:?usage: bench/run_gpu_step.sh OUT_DIR}
mkdir -p "$OUT"
run() {  # name, args...
  local name=$1; shift
  echo "== $name $(date +%T)"
  python3 bench/bench_step.py --device cuda "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1 \
    && tail -n 12 "$OUT/$name.log" || { echo "FAILED $name"; tail -n 30 "$OUT/$name.log"; }
}
for dtype in fp32 bf16; do
  run "minilm-$dtype" --model minilm-random --dtype $dtype --batch 32 --seq 64 --reps 30 --warmup 5
  run "smollm2-$dtype" --model smollm2-random --dtype $dtype --batch 8 --seq 256 --reps 20 --warmup 5
  run "llama1b-$dtype" --model llama-1b-random --dtype $dtype --batch 4 --seq 256 --reps 10 --warmup 3
done
for dtype in fp32 bf16; do
  run "smollm2-$dtype-memory" --model smollm2-random --dtype $dtype --batch 8 --seq 256 --memory
  run "llama1b-$dtype-memory" --model llama-1b-random --dtype $dtype --batch 4 --seq 256 --memory
done
