"""Which way of building W + S (and which SDDMM backend) is fastest, measured on the real step.

One MiniLM classifier training step (the setting of ``bench_step.py``: batch 32 x 64, fp32,
static random mask at LoRA r=8's parameter count, SparseAdamW), with the sparse model's
``weight_mode`` / ``backend`` switched between steps of the *same* model, interleaved
round-robin with the frozen floor and peft LoRA r=8, so every ratio comes from one stretch
of machine time. Variants are written ``mode`` or ``mode/backend``, e.g.
``clone,scratch,inplace,auto/gather``, with the library's defaults otherwise. A ``+fresh``
suffix makes the SDDMM transpose into fresh tensors instead of the reused scratch buffers
(``backends.TRANSPOSE_SCRATCH = False``, which also turns the batched token blocks off); a
``+blockN`` suffix runs one batched sampled_addmm over token blocks of about N tokens
(``backends.SDDMM_TOKEN_BLOCK = N``); a ``+chunkN`` suffix the earlier loop of 2-D calls over
chunks of about N tokens (``backends.SDDMM_TOKEN_CHUNK = N``, ``SDDMM_TOKEN_BLOCK = 0``).

Reproduce::

    python bench/bench_variants.py --reps 8 --out bench/results/variants_minilm.json
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402  (the same model, batch and setups)
from _results import write_result  # noqa: E402


DEFAULTS = {}


def set_variant(model, variant: str) -> None:
    from sparseft.delta import SparseDeltaLayer, backends

    if not DEFAULTS:
        DEFAULTS.update(block=backends.SDDMM_TOKEN_BLOCK, chunk=backends.SDDMM_TOKEN_CHUNK)
    variant, fresh, _ = variant.partition("+fresh")
    backends.TRANSPOSE_SCRATCH = not fresh
    variant, _, block = variant.partition("+block")
    variant, _, chunk = variant.partition("+chunk")
    backends.SDDMM_TOKEN_BLOCK = int(block) if block else (0 if chunk else DEFAULTS["block"])
    backends.SDDMM_TOKEN_CHUNK = int(chunk) if chunk else DEFAULTS["chunk"]
    mode, _, backend = variant.partition("/")
    for m in model.modules():
        if isinstance(m, SparseDeltaLayer):
            m.weight_mode = mode
            m.backend = backend or "auto"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="clone,scratch,inplace,auto")
    p.add_argument("--baselines", default="floor,lora", help="bench_step setups timed alongside")
    p.add_argument("--model", default="default", help="as in bench_step.py: default (MiniLM) | smollm2 | ...")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    bench_step.add_timing_options(p)
    args = p.parse_args()
    clock = bench_step.apply_timing_options(args)
    batch = bench_step.make_batch(args.batch, args.seq, args.model)
    baselines = [b for b in args.baselines.split(",") if b]
    variants = [v for v in args.variants.split(",") if v]
    built = {b: bench_step.build(b, args.rank, args.model) for b in baselines}
    built["sparse"] = bench_step.build("sparse", args.rank, args.model)
    for model, _, _ in built.values():
        bench_step.train_without_dropout(model)
    steps = {b: bench_step.make_step(*built[b], batch) for b in built}
    sparse_model = built["sparse"][0]
    names = baselines + [f"sparse:{v}" for v in variants]
    times = {n: [] for n in names}
    loads = []
    for rep in range(args.warmup + args.reps):
        loads.append(os.getloadavg()[0])
        for n in names:
            if n.startswith("sparse:"):
                set_variant(sparse_model, n.split(":", 1)[1])
                fn = steps["sparse"]
            else:
                fn = steps[n]
            t0 = clock()
            fn()
            if rep >= args.warmup:
                times[n].append(clock() - t0)
    median = {n: statistics.median(v) * 1000 for n, v in times.items()}
    # Per-repetition ratios (same round) give the spread of each ratio.
    per_rep = {}
    for ref in baselines:
        for n in names:
            if n == ref:
                continue
            r = [a / b for a, b in zip(times[n], times[ref])]
            per_rep[f"{n}/{ref}"] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
    result = {
        "median_ms": median,
        "all_ms": {n: [t * 1000 for t in v] for n, v in times.items()},
        "ratios": per_rep,
        "meta": {"torch": torch.__version__, "threads": torch.get_num_threads(), "model": args.model, "batch": args.batch, "seq": args.seq,
                 "rank": args.rank, "machine": platform.machine(), "clock": args.clock, "loadavg_per_rep": loads,
                 "loadavg_end": os.getloadavg(), "argv": sys.argv[1:]},
    }
    print(f"load average (1 min) per round: {[round(x, 2) for x in loads]}")
    print("| setup | median ms |" + "".join(f" / {b} (median [min, max]) |" for b in baselines))
    print("|---|---|" + "---|" * len(baselines))
    for n in names:
        cells = []
        for b in baselines:
            r = per_rep.get(f"{n}/{b}")
            cells.append(f" {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}] |" if r else " 1.00 |")
        print(f"| {n} | {median[n]:.0f} |" + "".join(cells))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
