"""The CPU sampled_addmm SDDMM of one layer: the loop of 2-D calls over token chunks (each
operand transposed per chunk) against one batched call over token blocks of several sizes.

Each variant sets ``backends.SDDMM_TOKEN_BLOCK`` (0: the chunked loop with
``SDDMM_TOKEN_CHUNK``) and times ``delta.sddmm(..., "sampled_addmm")`` on random operands,
interleaved round-robin, median over the rounds. Shapes: MiniLM's layers at 2,048 tokens
(batch 32 x 64) and 3.1 % density, SmolLM2's at 512 tokens (2 x 256) and 2.3 %, the
densities of LoRA r=8's parameter count in bench_step.py. This chose ``SDDMM_TOKEN_BLOCK``.
Weights with fewer rows than columns run as their transpose (``SDDMM_TRANSPOSE_WIDE``); the
last column times the default block size without that, "as is".

Reproduce (quiet machine)::

    python bench/bench_sddmm_blocks.py --out bench/results/quiet/sddmm_blocks.json
    python bench/bench_sddmm_blocks.py --threads 1 --rounds 15 --out bench/results/quiet/sddmm_blocks_1thread.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import sparseft.delta as delta
from sparseft.delta import backends

# (rows, cols, tokens, density)
CASES = [(384, 384, 2048, 0.031), (1536, 384, 2048, 0.031), (384, 1536, 2048, 0.031),
         (576, 576, 512, 0.023), (192, 576, 512, 0.023), (1536, 576, 512, 0.023), (576, 1536, 512, 0.023)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="0,128,256,512,1024", help="SDDMM_TOKEN_BLOCK values (0: chunked 2-D loop)")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backends.SDDMM_BLOCKS_MIN_THREADS = 1  # compare the two paths at any thread count
    blocks = [int(b) for b in args.blocks.split(",")]
    gen = torch.Generator().manual_seed(0)
    default_block = backends.SDDMM_TOKEN_BLOCK
    rows = []
    print("| weight | tokens | entries | " + " | ".join(f"block {b or 'off (chunks)'} ms" for b in blocks)
          + f" | best | block {default_block}, as is ms |")
    print("|---|---|---|" + "---|" * (len(blocks) + 2))
    for out_f, in_f, tokens, density in CASES:
        n = out_f * in_f
        idx = torch.randperm(n, generator=gen)[:int(density * n)].sort().values.to(torch.int32)
        layout = delta.IndexLayout(idx, (out_f, in_f))
        g, x = torch.randn(tokens, out_f, generator=gen), torch.randn(tokens, in_f, generator=gen)
        variants = [(b, True) for b in blocks] + [(default_block, False)]
        times = {v: [] for v in variants}
        for r in range(args.rounds + 3):
            for b, transpose_wide in variants:
                backends.SDDMM_TOKEN_BLOCK, backends.SDDMM_TRANSPOSE_WIDE = b, transpose_wide
                t0 = time.perf_counter()
                delta.sddmm(g, x, layout, "sampled_addmm")
                if r >= 3:
                    times[(b, transpose_wide)].append(time.perf_counter() - t0)
        backends.SDDMM_TOKEN_BLOCK, backends.SDDMM_TRANSPOSE_WIDE = default_block, True
        as_is = statistics.median(times.pop((default_block, False))) * 1000
        times = {b: times[(b, True)] for b in blocks}
        med = {b: statistics.median(v) * 1000 for b, v in times.items()}
        best = min(med, key=med.get)
        rows.append({"weight": [out_f, in_f], "tokens": tokens, "entries": layout.numel,
                     "median_ms": {str(b): v for b, v in med.items()}, "best_block": best,
                     "default_block_not_transposed_ms": as_is})
        print(f"| {out_f}x{in_f} | {tokens} | {layout.numel} | " + " | ".join(f"{med[b]:.2f}" for b in blocks)
              + f" | {best} | {as_is:.2f} |")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "chunk": backends.SDDMM_TOKEN_CHUNK,
                "machine": platform.machine(), "loadavg_end": os.getloadavg(), "argv": sys.argv[1:]}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
