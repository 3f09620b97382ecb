"""Inference cost of a sparse adapter: unmerged, merged, and merged-and-unloaded, against the base model.

What is measured
----------------
Median wall time of one forward pass (``torch.inference_mode``, eval mode) of the MiniLM
classifier on a fixed batch (default 32 x 64 tokens, fp32, CPU), for:

* ``base``       the plain model (no adapter);
* ``unmerged``   sparseft at LoRA r=8's parameter count (static random mask, nonzero values):
                 each sparse layer builds W + S on the fly (``weight_mode`` auto);
* ``merged``     the same adapter after ``SparseModel.merge()`` (wrappers kept, W holds W + S);
* ``unloaded``   ``merge_and_unload()``: a plain transformers model again;
* ``lora``       peft LoRA r=8, unmerged, for reference.

Setups are interleaved round-robin after a warm-up; each ratio is taken per round (same
stretch of machine time) and reported as median [min, max] over the rounds. Outputs are
checked first: merged and unloaded logits equal the unmerged ones to fp32 rounding.

Reproduce::

    python bench/bench_inference.py --reps 10 --out bench/results/inference_minilm.json
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
import bench_step  # noqa: E402  (the same model, batch and parameter count)
from _results import write_result  # noqa: E402

SETUPS = ("base", "unmerged", "merged", "unloaded", "lora")


def build(setup: str, rank: int):
    import peft

    import sparseft

    torch.manual_seed(0)  # the new classifier head: the same in every setup
    model = bench_step.load_base()
    if setup == "base":
        return model
    if setup == "lora":
        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=bench_step.TARGETS,
                              modules_to_save=["classifier"], init_lora_weights=False)  # nonzero B: a real adapter
        return peft.get_peft_model(model, cfg)
    k = bench_step.lora_param_count(model, rank)
    sm = sparseft.get_sparse_model(model, sparseft.SparseConfig(method="random", num_params=k,
                                                                target_modules=bench_step.TARGETS))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for v in sm.sparse_parameters():
            v.copy_(torch.randn(v.shape, generator=gen) * 1e-2)
    if setup == "merged":
        sm.merge()
    elif setup == "unloaded":
        return sm.merge_and_unload()
    return sm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    bench_step.add_timing_options(p)
    args = p.parse_args()
    clock = bench_step.apply_timing_options(args)
    setups = args.setups.split(",")
    batch = bench_step.make_batch(args.batch, args.seq)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    models = {s: build(s, args.rank).eval() for s in setups}

    def forward(model):
        with torch.inference_mode():
            return model(**inputs).logits

    logits = {s: forward(m) for s, m in models.items()}
    for s in ("merged", "unloaded"):
        if s in logits and "unmerged" in logits:
            torch.testing.assert_close(logits[s], logits["unmerged"], rtol=1e-4, atol=1e-5)
    times = {s: [] for s in setups}
    loads = []
    for rep in range(args.warmup + args.reps):
        loads.append(os.getloadavg()[0])
        for s in setups:
            t0 = clock()
            forward(models[s])
            if rep >= args.warmup:
                times[s].append(clock() - t0)
    median = {s: statistics.median(v) * 1000 for s, v in times.items()}
    ratios = {}
    if "base" in times:
        for s in setups:
            if s != "base":
                r = [a / b for a, b in zip(times[s], times["base"])]
                ratios[f"{s}/base"] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
    result = {
        "median_ms": median,
        "all_ms": {s: [t * 1000 for t in v] for s, v in times.items()},
        "ratios": ratios,
        "meta": {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch, "seq": args.seq,
                 "rank": args.rank, "machine": platform.machine(), "clock": args.clock, "loadavg_per_round": loads,
                 "loadavg_end": os.getloadavg(), "argv": sys.argv[1:]},
    }
    print(f"load average (1 min) per round: {[round(x, 2) for x in loads]}")
    print("| setup | forward ms | / base, median [min, max] over rounds |\n|---|---|---|")
    for s in setups:
        r = ratios.get(f"{s}/base")
        print(f"| {s} | {median[s]:.0f} | " + (f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}] |" if r else "1 |"))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
