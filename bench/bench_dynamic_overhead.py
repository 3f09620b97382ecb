"""Step-time overhead of the dynamic methods over a static mask, averaged over a run.

What is measured
----------------
The MiniLM classifier (batch 32 x 64, fp32, CPU; bench_step.py's model and batch), every
method at LoRA r=8's parameter count on the same targets, SparseAdamW. Each method runs
``--steps`` optimizer steps through ``SparseController`` exactly as ``sparseft.train`` drives
it (before_optimizer_step, forward/backward, before_update, optimizer step,
after_optimizer_step), and the wall time of each whole step, index surgery included, is
recorded. Methods are interleaved step by step (step t of every method, then step t+1), so
all of them see the same stretch of machine time. Reported: the mean step time per method
over the run and its ratio to the static mask's mean, plus the median of the per-step
ratios.

* ``static``     random mask chosen once (the reference);
* ``dynamic``    SPEFT dynamic schedule with the gradient scorer, rescoring every
                 ``--update-every`` steps from the last ``--score-window`` steps' dense
                 gradients. The bench's defaults (16 and 4: a quarter of the steps observe
                 dense gradients) are a pessimistic stand-in for the library's 128 and 8
                 (1/16 of the steps) over a run this short;
* ``id3``        ID3, unmasking at every step (``--unmask-every 1``, the bench's default; N > 1 unmasks
                 every N steps, which observes the dense gradient only then), the budget
                 reached at the last step;
* ``grow-drop``  SpIEL-style, swapping every ``--grow-drop-every`` steps, growing from the
                 dense gradients of the last ``--score-window`` steps before each swap (the
                 library's defaults: 8 of 20; SpIEL's code: 5 of 20);
* ``dst``        Dynamic Subset Tuning (dense gradients and optimizer state for the targeted
                 matrices): reported separately, it is a different cost class by design.

Reproduce::

    python bench/bench_dynamic_overhead.py --steps 32 --out bench/results/dynamic_overhead_minilm.json
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
import bench_step  # noqa: E402
from _results import write_result  # noqa: E402

METHODS = ("static", "dynamic", "id3", "grow-drop", "dst")


def build(name: str, args, calib: list[dict]):
    import sparseft

    torch.manual_seed(0)
    model = bench_step.load_base()
    k = bench_step.lora_param_count(model, args.rank)
    common = dict(num_params=k, target_modules=bench_step.TARGETS, modules_to_save=["classifier"])
    if name == "static":
        cfg = sparseft.SparseConfig(method="random", **common)
    elif name == "dynamic":
        cfg = sparseft.SparseConfig(method="gradient", schedule="dynamic",
                                    dynamic=sparseft.DynamicOptions(update_every=args.update_every,
                                                                    score_window=args.score_window),
                                    calibration=sparseft.CalibrationOptions(examples=len(calib) * args.batch), **common)
    elif name == "id3":
        cfg = sparseft.SparseConfig(method="id3", id3=sparseft.ID3Options(unmask_every=args.unmask_every), **common)
    elif name == "grow-drop":
        cfg = sparseft.SparseConfig(method="grow-drop", grow_drop=sparseft.GrowDropOptions(
            every=args.grow_drop_every, score_window=args.score_window), **common)
    elif name == "dst":
        cfg = sparseft.SparseConfig(method="dst", **common)
    else:
        raise ValueError(name)
    sm = sparseft.get_sparse_model(model, cfg, calibration_data=calib if name == "dynamic" else None)
    bench_step.train_without_dropout(sm)
    return sm, sparseft.create_optimizer(sm, lr=1e-3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of every method before the run")
    p.add_argument("--update-every", type=int, default=16)
    p.add_argument("--score-window", type=int, default=4)
    p.add_argument("--grow-drop-every", type=int, default=8)
    p.add_argument("--unmask-every", type=int, default=1, help="ID3: unmask every N steps (the dense gradient only then)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    bench_step.add_timing_options(p)
    args = p.parse_args()
    clock = bench_step.apply_timing_options(args)
    from sparseft.train import SparseController

    methods = args.methods.split(",")
    batch = bench_step.make_batch(args.batch, args.seq)
    calib = [batch]
    runs = {}
    for name in methods:
        model, opt = build(name, args, calib)
        ctl = SparseController(model, opt)
        ctl.train_begin(args.warmup + args.steps)
        runs[name] = (model, opt, ctl)

    def one_step(name: str, step: int) -> float:
        model, opt, ctl = runs[name]
        t0 = clock()
        ctl.before_optimizer_step(step)
        model(**batch).loss.backward()
        ctl.before_update(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctl.after_optimizer_step(step, batch)
        return clock() - t0

    times = {n: [] for n in methods}
    loads = []
    for step in range(1, args.warmup + args.steps + 1):
        loads.append(os.getloadavg()[0])
        for n in methods:
            t = one_step(n, step)
            if step > args.warmup:
                times[n].append(t)
    for n in methods:
        runs[n][2].train_end()
    mean = {n: statistics.mean(v) * 1000 for n, v in times.items()}
    ratios = {}
    if "static" in times:
        for n in methods:
            if n != "static":
                per_step = [a / b for a, b in zip(times[n], times["static"])]
                ratios[f"{n}/static"] = {"mean_ratio": mean[n] / mean["static"], "median_step_ratio": statistics.median(per_step),
                                         "min_step_ratio": min(per_step), "max_step_ratio": max(per_step)}
    result = {
        "mean_ms": mean,
        "all_ms": {n: [t * 1000 for t in v] for n, v in times.items()},
        "ratios": ratios,
        "meta": {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch, "seq": args.seq,
                 "rank": args.rank, "steps": args.steps, "update_every": args.update_every,
                 "score_window": args.score_window, "grow_drop_every": args.grow_drop_every,
                 "unmask_every": args.unmask_every,
                 "machine": platform.machine(), "clock": args.clock, "loadavg_per_step": loads, "loadavg_end": os.getloadavg(),
                 "argv": sys.argv[1:]},
    }
    print(f"load average (1 min) per step: {[round(x, 2) for x in loads]}")
    print("| method | mean step ms | mean / static | per-step ratio median [min, max] |\n|---|---|---|---|")
    for n in methods:
        r = ratios.get(f"{n}/static")
        cells = (f"{r['mean_ratio']:.2f} | {r['median_step_ratio']:.2f} [{r['min_step_ratio']:.2f}, {r['max_step_ratio']:.2f}]"
                 if r else "1.00 | 1.00")
        print(f"| {n} | {mean[n]:.0f} | {cells} |")
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
