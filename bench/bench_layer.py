"""Micro-benchmark: one linear layer's training step (forward + backward) on CPU.

What is measured
----------------
For a linear layer ``in -> out`` and ``tokens`` input rows, the median wall time of
``y = layer(x); (y * r).sum().backward()`` with ``r`` a fixed random tensor, for:

* ``floor``      frozen weight, ``x.requires_grad``: forward + input gradient only. The
                 lower bound for any method that trains this layer inside a network.
* ``sparse-*``   ``SparseDeltaLayer`` with random indices at the given density, one row per
                 SDDMM backend (``auto``, ``sampled_addmm``, ``gather``).
* ``full``       full fine-tuning: the weight requires grad (dense weight gradient).
* ``lora``       peft's LoRA ``Linear`` (built with ``get_peft_model`` on a one-layer
                 module; dropout 0) with rank ``round(k / (in + out))`` (at least 1), i.e.
                 about as many trainable parameters as the sparse delta's ``k`` entries.
* ``clone``      the pattern other sparse-FT libraries use: ``W.clone().view(-1)
                 .scatter_add(0, idx, values)`` then ``F.linear``, autograd through it
                 (builds the dense weight gradient, then gathers it).

Every setup has ``x.requires_grad`` (a layer inside a network must pass its input
gradient back). Setups are interleaved round-robin over repetitions after a warm-up, so
all ratios within one (shape, density) come from the same stretch of machine time. Before
timing, each sparse backend's values-gradient is checked against the full-FT dense weight
gradient gathered at the indices (and the clone pattern too).

Reproduce
---------
    . .venv/bin/activate
    python bench/bench_layer.py --shapes minilm --out bench/results/layer_minilm.json
    python bench/bench_layer.py --shapes all --reps 7 --out bench/results/layer.json

The JSON file keeps rows of shape groups not re-run, so ``--shapes minilm`` then
``--shapes smollm`` into the same file gives both (each row carries its run's meta).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from sparseft.delta import SparseDeltaLayer

SHAPES = {
    "minilm": [(384, 1536), (1536, 384), (384, 384)],
    "smollm": [(576, 1536), (1536, 576), (576, 576)],
}
DENSITIES = [0.001, 0.01, 0.05]
BACKENDS = ["auto", "sampled_addmm", "gather"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class OneLinear(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def make_setups(in_f: int, out_f: int, k: int, x: torch.Tensor, gen: torch.Generator) -> dict:
    """name -> (forward callable, list of tensors whose .grad to reset each step)."""
    base = nn.Linear(in_f, out_f)
    base.requires_grad_(False)
    idx = torch.randperm(in_f * out_f, generator=gen)[:k].sort().values.to(torch.int32)
    setups = {"floor": (base, [x])}

    for backend in BACKENDS:
        lin = nn.Linear(in_f, out_f)
        lin.load_state_dict(base.state_dict())
        layer = SparseDeltaLayer(lin, idx, backend=backend)
        setups[f"sparse-{backend}"] = (layer, [x, layer.values])

    full = nn.Linear(in_f, out_f)
    full.load_state_dict(base.state_dict())
    full.weight.requires_grad_(True)
    full.bias.requires_grad_(False)
    setups["full"] = (full, [x, full.weight])

    rank = max(1, round(k / (in_f + out_f)))
    lora_lin = nn.Linear(in_f, out_f)
    lora_lin.load_state_dict(base.state_dict())
    lora = get_peft_model(OneLinear(lora_lin), LoraConfig(r=rank, lora_alpha=rank, target_modules=["lin"], lora_dropout=0.0))
    lora_params = [p for p in lora.parameters() if p.requires_grad]
    setups["lora"] = (lora, [x, *lora_params])

    clone_vals = nn.Parameter(torch.zeros(k))
    idx_long = idx.long()

    def clone_fwd(inp):
        w = base.weight.clone().view(-1).scatter_add(0, idx_long, clone_vals).view_as(base.weight)
        return F.linear(inp, w, base.bias)

    setups["clone"] = (clone_fwd, [x, clone_vals])
    return setups, idx, rank, sum(p.numel() for p in lora_params)


def step(fn, grads, x, r):
    for t in grads:
        t.grad = None
    (fn(x) * r).sum().backward()


def check_grads(setups, idx, x, r) -> None:
    """Sparse values' gradient == full-FT dense gradient gathered at the indices."""
    step(*setups["full"], x, r)
    want = setups["full"][0].weight.grad.view(-1)[idx.long()]
    for name in [f"sparse-{b}" for b in BACKENDS] + ["clone"]:
        fn, grads = setups[name]
        step(fn, grads, x, r)
        got = grads[1].grad
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), f"{name}: values grad != dense grad at idx"


def bench_case(in_f, out_f, density, tokens, reps, warmup, gen) -> dict:
    k = max(1, round(density * in_f * out_f))
    x = torch.randn(tokens, in_f, generator=gen).requires_grad_(True)
    r = torch.randn(tokens, out_f, generator=gen)
    setups, idx, rank, lora_params = make_setups(in_f, out_f, k, x, gen)
    with torch.no_grad():  # real, non-zero deltas so W + S differs from W
        for b in BACKENDS:
            setups[f"sparse-{b}"][0].values.normal_(0, 0.01, generator=gen)
    check_grads(setups, idx, x, r)
    times = {name: [] for name in setups}
    for rep in range(warmup + reps):
        for name, (fn, grads) in setups.items():
            t0 = time.perf_counter()
            step(fn, grads, x, r)
            if rep >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    return {"in": in_f, "out": out_f, "density": density, "entries": k, "tokens": tokens,
            "lora_rank": rank, "lora_params": lora_params, "median_ms": med,
            "all_ms": {n: [round(1e3 * t, 4) for t in ts] for n, ts in times.items()}}


def table(rows) -> str:
    names = ["floor", *[f"sparse-{b}" for b in BACKENDS], "full", "lora", "clone"]
    head = ["shape", "density", "entries", "LoRA r", *[f"{n} ms" for n in names],
            "sparse/floor", "sparse/LoRA", "sparse/full", "clone/floor", "floor max/min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        m = row["median_ms"]
        s = m["sparse-auto"]
        cells = [f"{row['in']}->{row['out']}", f"{100 * row['density']:g}%", str(row["entries"]), str(row["lora_rank"]),
                 *[f"{m[n]:.2f}" for n in names],
                 f"{s / m['floor']:.2f}", f"{s / m['lora']:.2f}", f"{s / m['full']:.2f}", f"{m['clone'] / m['floor']:.2f}",
                 f"{max(row['all_ms']['floor']) / min(row['all_ms']['floor']):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--shapes", choices=["minilm", "smollm", "all"], default="all")
    ap.add_argument("--out", default="bench/results/layer.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(args.seed)
    groups = list(SHAPES) if args.shapes == "all" else [args.shapes]
    rows = []
    for group in groups:
        for in_f, out_f in SHAPES[group]:
            for density in DENSITIES:
                row = bench_case(in_f, out_f, density, args.tokens, args.reps, args.warmup, gen)
                row["group"] = group
                row["loadavg_1min"] = os.getloadavg()[0]
                rows.append(row)
                print(f"  done {group} {in_f}->{out_f} @ {100 * density:g}%", flush=True)
    print("\n(ratios use sparse-auto; 'floor max/min' over reps flags a noisy machine)\n" + table(rows))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
            "cpus": os.cpu_count(), "tokens": args.tokens, "reps": args.reps, "warmup": args.warmup,
            "lora": "peft LoRA Linear via get_peft_model (dropout 0)",
            "loadavg_end": os.getloadavg()}
    # Runs of other shape groups already in the file are kept (their own meta beside them).
    kept = []
    if out.exists():
        old = json.loads(out.read_text())
        kept = [r for r in old.get("rows", []) if r.get("group") not in groups]
    for r in rows:
        r["meta"] = meta
    out.write_text(json.dumps({"rows": kept + rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
