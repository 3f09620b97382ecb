"""Table of bench/run_tile_quality.sh's runs: test accuracy per granularity and seed, mean and spread.

Usage: python bench/tile_quality_table.py RUN_DIR [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

GRANULARITIES = ("entry", "tile16", "tile32")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs")
    p.add_argument("--out")
    args = p.parse_args()
    rows = {}
    for g in GRANULARITIES:
        for d in sorted(Path(args.runs).glob(f"{g}-s*")):
            m = d / "metrics.json"
            if m.is_file():
                data = json.loads(m.read_text())
                rows.setdefault(g, []).append({k: data.get(k) for k in (
                    "seed", "score", "validation_score", "trainable_params", "final_train_loss", "step_time_s")})
    print("| granularity | entries | test accuracy per seed | mean | validation mean | final train loss mean |")
    print("|---|---|---|---|---|---|")
    for g, runs in rows.items():
        acc = [r["score"] for r in runs]
        print(f"| {g} | {runs[0]['trainable_params']:,} | {', '.join(f'{a:.3f}' for a in acc)} | "
              f"{statistics.mean(acc):.3f} ± {statistics.pstdev(acc):.3f} | "
              f"{statistics.mean(r['validation_score'] for r in runs):.3f} | "
              f"{statistics.mean(r['final_train_loss'] for r in runs):.3f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
