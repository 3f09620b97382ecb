#!/usr/bin/env bash
# Training memory on a quantized base on one GPU: bench_quant_memory.py on CUDA for a
# random-weight Llama-3.2-1B-shaped (1.2 B) and a Llama-3.1-8B-shaped decoder, built from
# their configs in bf16, batch x seq 4 x 512, LoRA rank 16 and as many sparse entries.
# Memory is torch.cuda.max_memory_allocated: "extra" is the peak during the steps above
# what the loaded (and quantized) model holds. The 8 B float setups (LoRA, float sparse)
# hold 16 GB of bf16 weights; full fine-tuning of 8 B (~65 GB of weights, gradients and
# AdamW state plus activations) fits an 80 GB+ GPU only without much to spare, so it runs
# last and alone. Gradient checkpointing is on for the 8 B runs (as QLoRA recipes do).
# Usage: bench/run_gpu_quant.sh OUT_DIR     (needs: pip install -e ".[quant,baselines]")
set -u
OUT=${1:?usage: bench/run_gpu_quant.sh OUT_DIR}
mkdir -p "$OUT"
run() {  # name, args...
  local name=$1; shift
  echo "== $name $(date +%T)"
  python3 bench/bench_quant_memory.py --device cuda --dtype bf16 --batch 4 --seq 512 --rank 16 --steps 3 \
    --machine "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" "$@" --out "$OUT/$name.json" 2>&1 | tail -n 9
}
run llama1b --model llama-1b-random --setups sparse,sparse-nf4,sparse-int8,qlora,lora,full
run llama8b --model llama-8b-random --checkpointing --setups sparse-nf4,qlora,sparse,lora
run llama8b-full --model llama-8b-random --checkpointing --setups full
