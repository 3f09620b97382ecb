"""Summarise the runs of bench/scoring_table.sh into the markdown tables of docs/scoring.md.

Usage: python bench/scoring_table.py runs/scoring [> table.md]
Cells show mean ± sample std of the test accuracy over the seeds found, with (n) when
fewer than 3 seeds finished; missing cells say so.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

METHODS = ["random", "magnitude", "gradient", "snip", "taylor", "d3", "fisher", "grasp", "synflow"]
DENSITIES = ["0.01", "0.001"]


def load(root: Path) -> dict:
    runs = defaultdict(list)
    for f in sorted(root.glob("*/metrics.json")):
        schedule, method, density, _seed = f.parent.name.split("-")
        runs[(schedule, method, density[1:])].append(json.loads(f.read_text()))
    return runs


def cell(values: list[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return "missing"
    mean = statistics.mean(values)
    text = fmt.format(mean)
    if len(values) > 1:
        text += " ± " + fmt.format(statistics.stdev(values))
    if len(values) < 3:
        text += f" ({len(values)})"
    return text


def main(root: str) -> None:
    runs = load(Path(root))
    devices = sorted({r.get("device", "cpu") for rs in runs.values() for r in rs})
    on_gpu = any(d != "cpu" for d in devices)
    # On CUDA the selection's peak is the allocator's (model included); on CPU the extra RSS.
    mem_key, mem_label = (("selection_peak_gpu_mb", "selection peak GPU memory, MB")
                          if on_gpu else ("selection_extra_rss_mb", "selection extra peak RSS, MB"))
    print(f"runs on: {', '.join(devices)}\n")
    print("| scorer (static) | " + " | ".join(f"accuracy @ {d}" for d in DENSITIES)
          + f" | selection time, s @ 0.01 | {mem_label} @ 0.01 |")
    print("|---|" + "---|" * (len(DENSITIES) + 2))
    for m in METHODS:
        accs = [cell([r["score"] for r in runs[("static", m, d)]]) for d in DENSITIES]
        sel = runs[("static", m, "0.01")]
        t = cell([r["selection_seconds"] for r in sel], "{:.1f}")
        mem = cell([r[mem_key] for r in sel if r.get(mem_key) is not None], "{:.0f}")
        print(f"| {m} | " + " | ".join(accs) + f" | {t} | {mem} |")
    print()
    print("| gradient scorer | " + " | ".join(f"accuracy @ {d}" for d in DENSITIES) + " |")
    print("|---|" + "---|" * len(DENSITIES))
    for schedule in ("static", "dynamic"):
        accs = [cell([r["score"] for r in runs[(schedule, "gradient", d)]]) for d in DENSITIES]
        print(f"| {schedule} | " + " | ".join(accs) + " |")
    majority = {r["majority_rate"] for rs in runs.values() for r in rs}
    print(f"\nmajority-class rate of the test split: {', '.join(f'{m:.3f}' for m in sorted(majority))}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/scoring")
