#!/usr/bin/env bash
# The measured scorer table of docs/scoring.md: every scorer under a static mask, and
# static vs dynamic for gradient, on rt-sentiment (all-MiniLM-L6-v2), 2 densities x 3 seeds.
# Short runs (150 steps on 4,800 training examples); runs already done are skipped.
# Usage: bench/scoring_table.sh [runs/scoring]   then: python bench/scoring_table.py runs/scoring
# Environment: EXTRA="--device cuda" adds arguments to every run; JOBS=N runs N at a time.
set -u
OUT=${1:-runs/scoring}
JOBS=${JOBS:-1}
COMMON="--task rt-sentiment --max-steps 150 --max-train-examples 4800 --max-eval-examples 1000 --lr 5e-3 --no-progress"
run() {  # name, args...
  local dir="$OUT/$1"; shift
  [ -f "$dir/metrics.json" ] && return
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  echo "== $dir $(date +%T)"
  { sparseft train $COMMON ${EXTRA:-} --out "$dir" "$@" > "$dir.log" 2>&1 || echo "FAILED $dir (see $dir.log)"; } &
}
mkdir -p "$OUT"
for seed in 0 1 2; do
  for density in 0.01 0.001; do
    for method in gradient random magnitude snip taylor d3 fisher grasp synflow; do
      run "static-$method-d$density-s$seed" --method "$method" --density "$density" --seed "$seed"
    done
    run "dynamic-gradient-d$density-s$seed" --method gradient --schedule dynamic --update-every 50 \
        --density "$density" --seed "$seed"
  done
done
wait
