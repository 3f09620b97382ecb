"""SparseAdamW's step against torch's AdamW on the same sparse values, interleaved.

The parameters are those of ``bench_step.py``'s sparse setup (static random mask at LoRA
r=8's count, one gradient computed once). Four optimizers step in turn, each with its own
state: ``sparse-flat`` (SparseAdamW, the default: every entry has the same age, all
parameters packed into one flat buffer, one op per AdamW stage; the gradients are gathered
into one buffer at each step, included), ``sparse`` (``flat=False``: the same arithmetic with
foreach ops over the per-layer tensors),
``sparse-mixed-ages`` (SparseAdamW after one fresh entry joined each parameter: the
per-entry bias-correction path that ID3 and grow-drop take), and ``torch`` (torch.optim.AdamW,
its default foreach implementation). Prints median milliseconds and ratios to torch's.

Reproduce::

    python bench/bench_optimizer.py --out bench/results/quiet/optimizer_minilm.json
    python bench/bench_optimizer.py --model smollm2 --out bench/results/quiet/optimizer_smollm2.json
    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_optimizer.py --threads 1 --clock cpu \
        --out bench/results/2026-11-29/optimizer_flat_minilm_cpu1.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402

from sparseft import SparseAdamW  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="a bench_step model: default (MiniLM) or smollm2")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--reps", type=int, default=30)
    bench_step.add_timing_options(p)
    args = p.parse_args()
    clock = bench_step.apply_timing_options(args)
    warnings.filterwarnings("ignore")
    model, _, _ = bench_step.build("sparse", args.rank, args.model)
    params = model.sparse_parameters()
    for q in params:
        q.grad = torch.randn_like(q)
    opts = {"sparse-flat": SparseAdamW(params, lr=1e-3), "sparse": SparseAdamW(params, lr=1e-3, flat=False),
            "sparse-mixed-ages": SparseAdamW(params, lr=1e-3, flat=False),
            "torch": torch.optim.AdamW(params, lr=1e-3)}
    for opt in opts.values():
        opt.step()
    mixed = opts["sparse-mixed-ages"]
    for q in params:  # one entry starts afresh in every parameter: ages now differ
        n = q.numel()
        mixed.remap_entries(q, torch.arange(1, n), torch.arange(1, n))
    times = {name: [] for name in opts}
    for _ in range(args.reps):
        for name, opt in opts.items():
            t0 = clock()
            opt.step()
            times[name].append(clock() - t0)
    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    print(f"{args.model}: {len(params)} parameters, {sum(q.numel() for q in params):,} entries, "
          f"{torch.get_num_threads()} threads")
    print("| optimizer | step ms | / torch AdamW |\n|---|---|---|")
    for name, ms in med.items():
        print(f"| {name} | {ms:.2f} | {ms / med['torch']:.2f} |")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"median_ms": med, "all_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
                       "meta": {"model": args.model, "parameters": len(params), "threads": torch.get_num_threads(),
                                "clock": args.clock, "torch": torch.__version__, "argv": sys.argv[1:]}}, fh, indent=2)


if __name__ == "__main__":
    main()
