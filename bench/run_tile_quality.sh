#!/usr/bin/env bash
# Tiles against entries at equal parameter counts: the gradient scorer (|g| from 64
# calibration examples; tiles score by their mean |g|), LoRA r=8's count on every linear
# layer of MiniLM, rt-sentiment, short runs (80 steps of 16 x 48 tokens), 3 seeds, 1 thread.
# Usage: bench/run_tile_quality.sh OUT_DIR   (skips runs whose metrics.json exists; JOBS=N at once)
# Then: python bench/tile_quality_table.py OUT_DIR
set -u
OUT=${1:?usage: bench/run_tile_quality.sh OUT_DIR}
JOBS=${JOBS:-1}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
COMMON="--task rt-sentiment --method gradient --calib-examples 64 --match-lora-rank 8 --max-steps 40 --batch-size 16
        --max-length 32 --max-train-examples 1000 --max-eval-examples 300 --no-progress"
for seed in 0 1 2; do
  for granularity in entry tile16 tile32; do
    dir=$OUT/$granularity-s$seed
    [ -f "$dir/metrics.json" ] && continue
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    { nice -n 10 python -m sparseft.app.cli train $COMMON --granularity "$granularity" --seed "$seed" --out "$dir" \
        > "$OUT/$granularity-s$seed.log" 2>&1; echo "$(date +%T) $dir rc=$?"; } &
  done
done
wait
