#!/usr/bin/env bash
# The measurement behind docs/dynamic_methods.md: default task, short runs, 1 thread each.
# Usage: bench/run_dynamic.sh [out_dir]   (resumes: skips runs whose metrics.json exists)
# Environment: EXTRA="--device cuda" adds arguments to every run; JOBS=N runs N at a time.
set -u
OUT=${1:-runs/dynamic}
JOBS=${JOBS:-1}
mkdir -p "$OUT"
COMMON="--task rt-sentiment --max-steps 150 --max-train-examples 4800 --max-eval-examples 1000 --no-progress"
export OMP_NUM_THREADS=1
for density in 0.01 0.001; do
  for seed in 0 1 2; do
    for method in random id3 dst gradient; do
      dir=$OUT/$method-d$density-s$seed
      [ -f "$dir/metrics.json" ] && continue
      args="--method $method"  # gradient: a static |g| mask from 1024 calibration examples
      while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
      { sparseft train $COMMON ${EXTRA:-} $args --density "$density" --seed "$seed" --out "$dir" \
          > "$OUT/$method-d$density-s$seed.log" 2>&1; echo "$(date +%T) $dir rc=$?"; } &
    done
  done
done
wait
