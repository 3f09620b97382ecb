"""Model-level benchmark: one training step of the embedded MiniLM classifier, per method.

What is measured
----------------
Median wall time of one optimizer step (forward + backward + optimizer step + zero_grad)
on a fixed batch (default 32 sequences x 64 tokens, fp32, CPU), for:

* ``floor``        every weight frozen, gradients flowing to the inputs (``inputs_embeds``
                   requires grad): the least any fine-tuning method can cost.
* ``sparse``       sparseft, static random mask with as many entries as LoRA r (``--rank``)
                   on the same targets; SparseAdamW.
* ``lora``         peft LoRA of rank r on all linear layers of the encoder (+ pooler).
* ``shira``        peft SHiRA with the same parameter count (peft's own sparse method).
* ``supertuning``  peft Super-Tuning (magnitude support) at the same density.
* ``full``         full fine-tuning, torch AdamW.

Every method also trains the new classifier head densely. Setups are interleaved
round-robin after a warm-up, so the ratios come from one stretch of machine time.

With ``--memory`` each setup instead runs in its own process, and the peak RSS of that
process (after ``--steps`` steps) is reported, next to the RSS right after loading.

Reproduce::

    python bench/bench_step.py --reps 6 --out bench/results/step_minilm.json
    python bench/bench_step.py --memory --out bench/results/step_minilm_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

SETUPS = ("floor", "sparse", "lora", "shira", "supertuning", "full")
TARGETS = ["query", "key", "value", "dense"]  # every Linear of the BERT encoder and pooler


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_base():
    from sparseft.pretrained import load_classifier

    model, _, _ = load_classifier("default", num_labels=2)
    return model


def lora_param_count(model, rank: int) -> int:
    from sparseft.inject import find_target_modules
    from sparseft.delta import linear_shape
    from sparseft.select import lora_equivalent_params

    names = find_target_modules(model, TARGETS, modules_to_save=["classifier"])
    return lora_equivalent_params({n: linear_shape(model.get_submodule(n)) for n in names}, rank)


def build(setup: str, rank: int):
    """(model, optimizer or None, uses_inputs_embeds)."""
    import peft

    import sparseft

    model = load_base()
    targeted = sum(model.get_submodule(n).weight.numel() for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n != "classifier")
    k = lora_param_count(model, rank)
    if setup == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        return model, None, True
    if setup == "full":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5), False
    if setup == "sparse":
        sm = sparseft.get_sparse_model(model, sparseft.SparseConfig(method="random", num_params=k, target_modules=TARGETS))
        return sm, sparseft.create_optimizer(sm, lr=1e-3), False
    if setup == "lora":
        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS, modules_to_save=["classifier"])
    elif setup == "shira":
        cfg = peft.ShiraConfig(r=rank, target_modules=TARGETS, modules_to_save=["classifier"])
    elif setup == "supertuning":
        cfg = peft.SupertuningConfig(sparsity=1 - k / targeted, target_modules=TARGETS, modules_to_save=["classifier"])
    else:
        raise ValueError(setup)
    pm = peft.get_peft_model(model, cfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    return pm, torch.optim.AdamW(params, lr=1e-3), False


def trainable_count(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)


def make_batch(batch: int, seq: int):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 29000, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (batch,), generator=gen)}


def make_step(model, optimizer, uses_embeds: bool, batch: dict):
    if uses_embeds:
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach()

        def step():
            x = embeds.clone().requires_grad_(True)
            model(inputs_embeds=x, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        return step

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def run_timing(args) -> dict:
    batch = make_batch(args.batch, args.seq)
    built = {s: build(s, args.rank) for s in args.setups}
    for model, _, _ in built.values():
        model.train()
        for m in model.modules():  # no dropout: every setup does the same arithmetic each rep
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    steps = {s: make_step(*built[s], batch) for s in args.setups}
    times = {s: [] for s in args.setups}
    for rep in range(args.warmup + args.reps):
        for s in args.setups:
            t0 = time.perf_counter()
            steps[s]()
            if rep >= args.warmup:
                times[s].append(time.perf_counter() - t0)
    median = {s: statistics.median(v) * 1000 for s, v in times.items()}
    return {
        "median_ms": median,
        "all_ms": {s: [t * 1000 for t in v] for s, v in times.items()},
        "trainable_params": {s: trainable_count(built[s][0]) for s in args.setups},
        "ratios": {
            "sparse/floor": median.get("sparse", float("nan")) / median.get("floor", float("nan")),
            "sparse/lora": median.get("sparse", float("nan")) / median.get("lora", float("nan")),
            "sparse/full": median.get("sparse", float("nan")) / median.get("full", float("nan")),
        },
    }


def run_memory_child(setup: str, args) -> dict:
    model, opt, embeds = build(setup, args.rank)
    model.train()
    after_load = rss_mb()
    step = make_step(model, opt, embeds, make_batch(args.batch, args.seq))
    for _ in range(args.steps):
        step()
    return {"setup": setup, "rss_after_load_mb": after_load, "peak_rss_mb": rss_mb(), "trainable_params": trainable_count(model)}


def run_memory(args) -> dict:
    rows = {}
    for s in args.setups:
        cmd = [sys.executable, __file__, "--child", s, "--rank", str(args.rank), "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[s] = json.loads(out.strip().splitlines()[-1])
    return {"memory": rows}


def table(result: dict) -> str:
    lines = []
    if "median_ms" in result:
        m = result["median_ms"]
        floor = m.get("floor")
        lines += ["| setup | trainable (excl. head) | step ms | / floor | sparse / this |", "|---|---|---|---|---|"]
        for s, ms in m.items():
            lines.append(f"| {s} | {result['trainable_params'][s]:,} | {ms:.0f} | {ms / floor:.2f} | {m.get('sparse', float('nan')) / ms:.2f} |")
    if "memory" in result:
        lines += ["| setup | RSS after load MB | peak RSS MB | peak - load MB |", "|---|---|---|---|"]
        for s, r in result["memory"].items():
            lines.append(f"| {s} | {r['rss_after_load_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['rss_after_load_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--rank", type=int, default=8, help="LoRA rank; the sparse methods match its parameter count")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--memory", action="store_true", help="peak RSS per setup, each in its own process")
    p.add_argument("--steps", type=int, default=3, help="steps per process with --memory")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.setups = args.setups.split(",")
    if args.child:
        print(json.dumps(run_memory_child(args.child, args)))
        return
    result = run_memory(args) if args.memory else run_timing(args)
    result["meta"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
                      "seq": args.seq, "rank": args.rank, "machine": platform.machine(),
                      "loadavg": os.getloadavg(), "argv": sys.argv[1:]}
    print(table(result))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
