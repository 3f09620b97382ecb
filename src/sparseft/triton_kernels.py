"""Triton kernels for the sparse delta on GPU: the element-wise SDDMM (low densities), the
block-sparse SDDMM of tile masks, and W + S in one pass.

Triton is optional (``pip install triton``; it comes with CUDA builds of torch). Without it
``available()`` is False and nothing here is used. Every kernel also runs under Triton's
interpreter (``TRITON_INTERPRET=1``) on CPU tensors, which is how the tests check them
against dense references on a machine without a GPU.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency
    triton = None
    tl = None


def available() -> bool:
    return triton is not None


def _require() -> None:
    if triton is None:
        raise RuntimeError("the Triton kernels need the triton package (pip install triton)")


if triton is not None:

    @triton.jit
    def _sddmm_kernel(g_ptr, x_ptr, rows_ptr, cols_ptr, out_ptr, tokens, entries, ldg, ldx,
                      BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
        # one program: BLOCK_E entries, their dot products over all tokens
        e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        live = e < entries
        r = tl.load(rows_ptr + e, mask=live, other=0).to(tl.int64)
        c = tl.load(cols_ptr + e, mask=live, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_E], dtype=tl.float32)
        for t0 in range(0, tokens, BLOCK_T):
            t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            m = (t < tokens)[:, None] & live[None, :]
            gv = tl.load(g_ptr + t[:, None] * ldg + r[None, :], mask=m, other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + t[:, None] * ldx + c[None, :], mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(gv * xv, axis=0)
        tl.store(out_ptr + e, acc, mask=live)

    @triton.jit
    def _tile_sddmm_kernel(g_ptr, x_ptr, trow_ptr, tcol_ptr, out_ptr, tokens, ldg, ldx,
                           T: tl.constexpr, BLOCK_T: tl.constexpr):
        # one program: one T x T tile, g[:, rows]^T @ x[:, cols] over the tokens
        b = tl.program_id(0)
        r0 = tl.load(trow_ptr + b).to(tl.int64) * T
        c0 = tl.load(tcol_ptr + b).to(tl.int64) * T
        i = tl.arange(0, T).to(tl.int64)
        acc = tl.zeros([T, T], dtype=tl.float32)
        for t0 in range(0, tokens, BLOCK_T):
            t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            m = (t < tokens)[:, None]
            gb = tl.load(g_ptr + t[:, None] * ldg + (r0 + i)[None, :], mask=m, other=0.0)
            xb = tl.load(x_ptr + t[:, None] * ldx + (c0 + i)[None, :], mask=m, other=0.0)
            acc += tl.dot(tl.trans(gb), xb)
        tl.store(out_ptr + b * T * T + i[:, None] * T + i[None, :], acc)

    @triton.jit
    def _add_sparse_kernel(w_ptr, out_ptr, idx_ptr, val_ptr, starts_ptr, numel,
                           BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
        # one program: BLOCK weights copied, plus the entries of the sorted index that fall in
        # them (found between starts[p] and starts[p + 1]), added in registers
        p = tl.program_id(0)
        offs = p.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < numel
        w = tl.load(w_ptr + offs, mask=live, other=0.0).to(tl.float32)
        lo = tl.load(starts_ptr + p)
        hi = tl.load(starts_ptr + p + 1)
        for e0 in range(lo, hi, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            me = e < hi
            pos = tl.load(idx_ptr + e, mask=me, other=-1).to(tl.int64)
            v = tl.load(val_ptr + e, mask=me, other=0.0).to(tl.float32)
            hit = offs[:, None] == pos[None, :]
            w += tl.sum(tl.where(hit, v[None, :], 0.0), axis=1)
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=live)


def _token_major(a: torch.Tensor) -> torch.Tensor:
    return a if a.stride(-1) == 1 else a.contiguous()


def sddmm(row_factor: torch.Tensor, col_factor: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
          block_entries: int = 64, block_tokens: int = 64) -> torch.Tensor:
    """out[e] = sum_t row_factor[t, rows[e]] * col_factor[t, cols[e]] (fp32 accumulation,
    returned in the factors' dtype); ``rows``/``cols`` int32 or int64 per entry."""
    _require()
    g, x = _token_major(row_factor), _token_major(col_factor)
    n = rows.numel()
    out = torch.empty(n, dtype=torch.float32, device=g.device)
    if n:
        grid = (triton.cdiv(n, block_entries),)
        _sddmm_kernel[grid](g, x, rows, cols, out, g.shape[0], n, g.stride(0), x.stride(0),
                            BLOCK_E=block_entries, BLOCK_T=block_tokens)
    return out.to(row_factor.dtype)


def tile_sddmm(row_factor: torch.Tensor, col_factor: torch.Tensor, tile_rows: torch.Tensor, tile_cols: torch.Tensor,
               t: int, block_tokens: int = 64) -> torch.Tensor:
    """(tiles x t x t) fp32: row_factor[:, tile rows]^T @ col_factor[:, tile cols] per tile."""
    _require()
    g, x = _token_major(row_factor), _token_major(col_factor)
    n = tile_rows.numel()
    out = torch.empty(n, t, t, dtype=torch.float32, device=g.device)
    if n:
        _tile_sddmm_kernel[(n,)](g, x, tile_rows, tile_cols, out, g.shape[0], g.stride(0), x.stride(0),
                                 T=t, BLOCK_T=block_tokens)
    return out


def add_sparse(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, out: torch.Tensor | None = None,
               block: int = 1024, block_entries: int = 32) -> torch.Tensor:
    """W + S in one pass: ``weight`` copied into ``out`` (new if None) with ``values`` added at
    the sorted flat ``indices``."""
    _require()
    w = weight.contiguous()
    out = torch.empty_like(w) if out is None else out
    numel = w.numel()
    blocks = triton.cdiv(numel, block)
    bounds = torch.arange(blocks + 1, device=w.device, dtype=torch.int64) * block
    starts = torch.searchsorted(indices.to(torch.int64), bounds).to(torch.int32)
    _add_sparse_kernel[(blocks,)](w.view(-1), out.view(-1), indices, values, starts, numel,
                                  BLOCK=block, BLOCK_E=block_entries)
    return out
