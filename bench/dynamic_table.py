"""Markdown table (mean ± std over seeds) from the runs of bench/run_dynamic.sh.

Usage: python bench/dynamic_table.py runs/dynamic
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def main(folder: str) -> None:
    groups = defaultdict(list)
    for f in sorted(Path(folder).glob("*/metrics.json")):
        m = json.loads(f.read_text())
        label = f.parent.name.rsplit("-d", 1)[0]
        groups[(m["config"]["density"], label)].append(m)

    def fmt(vals, spec):
        if len(vals) == 1:
            return format(vals[0], spec)
        return f"{format(statistics.mean(vals), spec)} ± {format(statistics.stdev(vals), spec)}"

    runs_all = [r for rs in groups.values() for r in rs]
    # CUDA runs report the allocator's peak (training and evaluation); CPU runs the process RSS.
    gpu = all(r.get("peak_gpu_mb") is not None for r in runs_all)
    mem_key, mem_label = ("peak_gpu_mb", "peak GPU memory (MB)") if gpu else ("peak_rss_mb", "peak RSS (MB)")
    print(f"runs on: {', '.join(sorted({r.get('device', 'cpu') for r in runs_all}))}\n")
    print("| density | method | seeds | test accuracy | trainable (B) | mean active entries | step time (s) "
          f"| train time (s) | {mem_label} | adapter (KB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (density, label), runs in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        print(f"| {density:g} | {label} | {','.join(str(r['seed']) for r in runs)} "
              f"| {fmt([r['score'] for r in runs], '.4f')} | {runs[0]['trainable_params']:,} "
              f"| {fmt([r['mean_active_entries'] for r in runs], ',.0f')} "
              f"| {fmt([r['step_time_s'] for r in runs], '.2f')} | {fmt([r['train_seconds'] for r in runs], '.0f')} "
              f"| {fmt([r[mem_key] for r in runs], '.0f')} | {fmt([r['adapter_bytes'] / 1024 for r in runs], '.0f')} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/dynamic")
