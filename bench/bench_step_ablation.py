"""Where the sparse step's time above the floor goes: the same sparse model stepped with
parts of its backward/forward replaced by no-ops, interleaved with the floor setup.

Variants (timing only: the no-op variants compute wrong gradients on purpose):

* ``current``   the real sparse step;
* ``no_sddmm``  the values' gradient replaced by zeros (no SDDMM, no operand transposes);
* ``no_w+s``    the kernels run on W instead of W + S (no scratch copy / in-place add);
* ``neither``   both;
* ``inplace``   the real step with W + S built in place (weight mode "inplace") in every layer;
* ``scratch``   the same with weight mode "scratch".

Reproduce (quiet machine, 2 threads)::

    python bench/bench_step_ablation.py --model default --batch 32 --seq 64 --rank 8 --reps 6
    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_step_ablation.py --setup tile16 --threads 1 --clock cpu --reps 8
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402

from sparseft.delta import function as delta_function  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", help="comma-separated subset of the variants (default: all)")
    p.add_argument("--setup", default="sparse", help="the sparse setup of bench_step: sparse, tile16 or tile32")
    bench_step.add_timing_options(p)
    args = p.parse_args()
    timer = bench_step.apply_timing_options(args)

    real_sddmm, real_weight = delta_function.sddmm, delta_function.with_effective_weight

    def zero_sddmm(row_factor, col_factor, layout, backend, *owners):
        return row_factor.new_zeros(layout.numel)

    def plain_weight(weight, values, layout, mode, fn):
        return fn(weight.detach())

    def forced_weight(mode):
        def weight(w, values, layout, _, fn):
            return real_weight(w, values, layout, mode, fn)
        return weight

    variants = {"current": (real_sddmm, real_weight), "no_sddmm": (zero_sddmm, real_weight),
                "no_w+s": (real_sddmm, plain_weight), "neither": (zero_sddmm, plain_weight),
                "inplace": (real_sddmm, forced_weight("inplace")), "scratch": (real_sddmm, forced_weight("scratch"))}
    if args.variants:
        variants = {k: variants[k] for k in args.variants.split(",")}
    sparse = bench_step.build(args.setup, args.rank, args.model)
    floor = bench_step.build("floor", args.rank, args.model)
    for model, _, _ in (sparse, floor):
        bench_step.train_without_dropout(model)
    batch = bench_step.make_batch(args.batch, args.seq, args.model)
    sparse_step, floor_step = bench_step.make_step(*sparse, batch), bench_step.make_step(*floor, batch)
    times: dict[str, list[float]] = {k: [] for k in [*variants, "floor"]}
    try:
        for rep in range(args.warmup + args.reps):
            for name, (sddmm, weight) in variants.items():
                delta_function.sddmm, delta_function.with_effective_weight = sddmm, weight
                t0 = timer()
                sparse_step()
                if rep >= args.warmup:
                    times[name].append(timer() - t0)
            delta_function.sddmm, delta_function.with_effective_weight = real_sddmm, real_weight
            t0 = timer()
            floor_step()
            if rep >= args.warmup:
                times["floor"].append(timer() - t0)
    finally:
        delta_function.sddmm, delta_function.with_effective_weight = real_sddmm, real_weight
    median = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print("| variant | step ms | / floor |\n|---|---|---|")
    for name, ms in median.items():
        print(f"| {name} | {ms:.0f} | {ms / median['floor']:.3f} |")
    if args.out:
        result = {"median_ms": median, "all_ms": {k: [t * 1000 for t in v] for k, v in times.items()},
                  "meta": {"setup": args.setup, "model": args.model, "threads": torch.get_num_threads(),
                           "clock": args.clock, "loadavg": os.getloadavg(), "argv": sys.argv[1:]}}
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
