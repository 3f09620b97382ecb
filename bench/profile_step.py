"""torch.profiler table of a few training steps of one bench_step setup (CPU ops, by self time).

Reproduce the SmolLM2 profile quoted in the README::

    python bench/profile_step.py --model smollm2 --batch 2 --seq 256 --setup sparse
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--setup", default="sparse", help="a bench_step setup: floor, sparse, lora, ...")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--by-shape", action="store_true", help="one row per op and input shapes")
    args = p.parse_args()
    model, optimizer, uses_embeds = bench_step.build(args.setup, args.rank, args.model)
    bench_step.train_without_dropout(model)
    step = bench_step.make_step(model, optimizer, uses_embeds, bench_step.make_batch(args.batch, args.seq, args.model))
    for _ in range(2):  # warm-up: allocator, first-call paths
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages(group_by_input_shape=args.by_shape).table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
