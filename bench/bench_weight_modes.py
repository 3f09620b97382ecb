"""Cost of building W + S alone, per weight mode (clone, scratch, inplace), by shape and density.

Times ``with_effective_weight`` with a kernel that does nothing (so only the W + S build and,
for ``inplace``, the restore are measured), 1 thread, interleaved round-robin; median over
the rounds after a warm-up. ``--clock cpu`` (default) uses this process's CPU time, which a
busy shared machine disturbs far less than wall time. This chose ``INPLACE_MAX_DENSITY``.

Reproduce::

    python bench/bench_weight_modes.py --out bench/results/weight_modes.json
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from sparseft import delta
from _results import write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="384x384,1536x384,576x1536")
    p.add_argument("--densities", default="0.001,0.01,0.03,0.1")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    modes = ("clone", "scratch", "inplace")
    rows = []
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        w = torch.randn(out_f, in_f)
        for dens in (float(d) for d in args.densities.split(",")):
            k = max(1, int(dens * w.numel()))
            idx = torch.randperm(w.numel())[:k].sort().values.to(torch.int32)
            values = torch.randn(k)
            layout = delta.IndexLayout(idx, w.shape)
            times = {m: [] for m in modes}
            with torch.no_grad():
                for rep in range(args.warmup + args.reps):
                    for m in modes:
                        t0 = clock()
                        delta.with_effective_weight(w, values, layout, m, lambda x: x[0, 0].clone())
                        if rep >= args.warmup:
                            times[m].append(clock() - t0)
            med = {m: statistics.median(v) * 1e6 for m, v in times.items()}
            rows.append({"shape": [out_f, in_f], "density": dens, "entries": k, "median_us": med})
            print(f"{out_f}x{in_f} density {dens:g} ({k} entries): " + ", ".join(f"{m} {v:.0f} us" for m, v in med.items()))
    result = {"rows": rows, "meta": {"torch": torch.__version__, "threads": 1, "clock": args.clock,
                                     "machine": platform.machine(), "loadavg_end": os.getloadavg(), "argv": sys.argv[1:]}}
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
