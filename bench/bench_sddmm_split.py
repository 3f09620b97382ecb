"""The CPU SDDMM (values' gradient) of one layer split into its operand reordering and the
whole call, for both sampled_addmm paths (the loop of 2-D calls over ~293-token chunks, each
operand transposed per chunk; one batched call over ~256-token blocks, each operand
reordered once), next to the dense weight-gradient matmul, at MiniLM's shapes.

Reproduce (quiet machine, 2 threads)::

    python bench/bench_sddmm_split.py --out bench/results/quiet/sddmm_split.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import sparseft.delta as delta
from sparseft.delta import backends


def per_call_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--density", type=float, default=0.031)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for out_f, in_f in [(384, 384), (1536, 384), (384, 1536)]:
        n = out_f * in_f
        idx = torch.randperm(n)[:int(args.density * n)].sort().values.to(torch.int32)
        layout = delta.IndexLayout(idx, (out_f, in_f))
        g, x = torch.randn(args.tokens, out_f), torch.randn(args.tokens, in_f)
        chunks = max(1, round(args.tokens / backends.SDDMM_TOKEN_CHUNK))
        n_blocks = max(1, round(args.tokens / backends.SDDMM_TOKEN_BLOCK))

        def transposes():  # what the chunked path transposes, chunk by chunk
            for c in range(chunks):
                s, e = args.tokens * c // chunks, args.tokens * (c + 1) // chunks
                backends._transposed_into_scratch(g[s:e], "row")
                backends._transposed_into_scratch(x[s:e], "col")

        def reorders():  # what the batched path reorders (no shared input here)
            backends._token_blocked(g, n_blocks, "row-blocks")
            backends._token_blocked(x, n_blocks, "col-blocks")

        def sddmm_with(block: int) -> float:
            saved = backends.SDDMM_TOKEN_BLOCK, backends.SDDMM_BLOCKS_MIN_THREADS
            backends.SDDMM_TOKEN_BLOCK, backends.SDDMM_BLOCKS_MIN_THREADS = block, 1
            try:
                return per_call_ms(lambda: delta.sddmm(g, x, layout, "sampled_addmm"), args.reps)
            finally:
                backends.SDDMM_TOKEN_BLOCK, backends.SDDMM_BLOCKS_MIN_THREADS = saved

        row = {"weight": [out_f, in_f], "entries": layout.numel,
               "chunks_transposes_ms": per_call_ms(transposes, args.reps),
               "chunks_sddmm_ms": sddmm_with(0),
               "blocks_reorders_ms": per_call_ms(reorders, args.reps),
               "blocks_sddmm_ms": sddmm_with(backends.SDDMM_TOKEN_BLOCK),
               "dense_grad_ms": per_call_ms(lambda: g.t().matmul(x), args.reps)}
        rows.append(row)
        print(f"{out_f}x{in_f}: chunks: transposes {row['chunks_transposes_ms']:.1f} of {row['chunks_sddmm_ms']:.1f} ms; "
              f"blocks: reorders {row['blocks_reorders_ms']:.1f} of {row['blocks_sddmm_ms']:.1f} ms; "
              f"dense weight gradient {row['dense_grad_ms']:.1f} ms")
    if args.out:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "tokens": args.tokens,
                "density": args.density, "chunk": backends.SDDMM_TOKEN_CHUNK, "block": backends.SDDMM_TOKEN_BLOCK}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
