"""Which CPU SDDMM backend is fastest (native, gather, sampled_addmm) per layer shape, token count and entry count.

Times ``delta.sddmm`` (the values' gradient of one layer) with each backend on random
operands and a random index set, interleaved, median of the repetitions, and prints what
``auto`` picks beside the measured winner. This chose ``delta.gather_is_cheaper``'s cost
model (used when the compiled kernel is unavailable) and showed the compiled kernel
(``native``) fastest wherever it applies. The cases cover MiniLM (2,048 tokens a step) and SmolLM2 (512 tokens a step) shapes
at their LoRA-r=8-equivalent densities, and the small-entry-count corners where gather wins.

Reproduce::

    python bench/bench_sddmm_backends.py --out bench/results/quiet/sddmm_backends.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch

from sparseft import delta, native
from sparseft.delta import IndexLayout, backends, sddmm

# (rows, cols, tokens, entries)
CASES = [
    (384, 384, 2048, 50), (384, 384, 2048, 147), (384, 384, 2048, 1475), (384, 384, 2048, 2506),
    (1536, 384, 2048, 100), (1536, 384, 2048, 590), (1536, 384, 2048, 5898),
    (384, 384, 512, 300), (576, 576, 512, 400), (576, 576, 512, 7630),
    (192, 576, 512, 300), (192, 576, 512, 2543), (1536, 576, 512, 20348),
    (64, 64, 512, 81), (384, 384, 64, 5000), (1536, 384, 64, 2000), (1536, 384, 64, 300),
]


def time_backend(g, x, layout, backend: str, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sddmm(g, x, layout, backend)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --reps calls per backend")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    backends = ["native", "gather", "sampled_addmm"] if native.available() else ["gather", "sampled_addmm"]
    print("| rows x cols | tokens | entries | " + " | ".join(f"{b} us" for b in backends)
          + " | gather/sampled | native/sampled | auto picks | fastest |")
    print("|---|---|---|" + "---|" * len(backends) + "---|---|---|---|")
    for rows, cols, tokens, k in CASES:
        idx = torch.randperm(rows * cols, generator=gen)[:k].sort().values.int()
        layout = IndexLayout(idx, (rows, cols))
        g, x = torch.randn(tokens, rows, generator=gen), torch.randn(tokens, cols, generator=gen)
        times = {b: [] for b in backends}
        for b in times:
            time_backend(g, x, layout, b, 2)  # warm-up
        for _ in range(args.rounds):
            for b in times:
                times[b] += time_backend(g, x, layout, b, args.reps)
        med = {b: statistics.median(v) * 1e6 for b, v in times.items()}
        if native.available():
            few = k < backends.NATIVE_GATHER_ENTRIES_PER_FEATURE * (rows + cols) and tokens * k <= backends.GATHER_AUTO_LIMIT
            picks = "gather" if few else "native"
        else:
            picks = "gather" if delta.gather_is_cheaper(tokens, k, rows, cols) else "sampled_addmm"
        faster = min(med, key=med.get)
        row = {"rows": rows, "cols": cols, "tokens": tokens, "entries": k, "median_us": med,
               "ratio_gather_over_sampled": med["gather"] / med["sampled_addmm"],
               "ratio_native_over_sampled": med.get("native", float("nan")) / med["sampled_addmm"],
               "auto": picks, "faster": faster}
        rows_out.append(row)
        print(f"| {rows}x{cols} | {tokens} | {k} | " + " | ".join(f"{med[b]:.0f}" for b in backends)
              + f" | {row['ratio_gather_over_sampled']:.2f} | {row['ratio_native_over_sampled']:.2f} | {picks} | {faster} |",
              flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                "loadavg_end": os.getloadavg(), "argv": sys.argv[1:]}
        with open(args.out, "w") as fh:
            json.dump({"cases": rows_out, "meta": meta}, fh, indent=2)


if __name__ == "__main__":
    main()
