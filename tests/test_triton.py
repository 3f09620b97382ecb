"""The Triton kernels against dense references, in Triton's interpreter on CPU tensors.

The ``test`` extra installs triton on Linux x86-64, so CI runs them; elsewhere (no triton
wheel) they are skipped. On a CUDA machine set SPARSEFT_TRITON_CUDA=1 to run them on the GPU
instead of the interpreter.
"""
from __future__ import annotations

import os

import pytest
import torch

ON_CUDA = bool(os.environ.get("SPARSEFT_TRITON_CUDA")) and torch.cuda.is_available()
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined and launched
pytest.importorskip("triton")

from sparseft import triton_kernels as tk  # noqa: E402
from sparseft.tiles import select_entries  # noqa: E402

DEVICE = "cuda" if ON_CUDA else "cpu"


def _factors(tokens, rows, cols, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(tokens, rows, generator=gen).to(DEVICE, dtype)
    x = torch.randn(tokens, cols, generator=gen).to(DEVICE, dtype)
    return g, x


@pytest.mark.parametrize("tokens, rows, cols, k", [(70, 24, 40, 50), (5, 8, 8, 64), (33, 16, 48, 1)])
def test_sddmm_matches_the_dense_weight_gradient(tokens, rows, cols, k):
    g, x = _factors(tokens, rows, cols)
    idx = torch.sort(torch.randperm(rows * cols, generator=torch.Generator().manual_seed(1))[:k]).values
    rows_i, cols_i = (idx // cols).to(torch.int32).to(DEVICE), (idx % cols).to(torch.int32).to(DEVICE)
    ref = (g.double().t() @ x.double()).reshape(-1)[idx.to(DEVICE)]
    out = tk.sddmm(g, x, rows_i, cols_i, block_entries=16, block_tokens=16)
    assert torch.allclose(out.double(), ref, atol=1e-4, rtol=1e-5)


def test_sddmm_reads_strided_token_major_views():
    g, x = _factors(40, 16, 64)
    xv = x[:, 8:40]  # a column slice: row stride 64
    idx = torch.arange(0, 16 * 32, 7)
    out = tk.sddmm(g, xv, (idx // 32).to(DEVICE), (idx % 32).to(DEVICE), block_entries=16, block_tokens=16)
    ref = (g.t() @ xv).reshape(-1)[idx.to(DEVICE)]
    assert torch.allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize("t", [16, 32])
def test_tile_sddmm_matches_the_dense_weight_gradient(t):
    rows, cols = 2 * t, 3 * t
    g, x = _factors(50, rows, cols)
    tile_ids = torch.tensor([0, 2, 4, 5])
    out = tk.tile_sddmm(g, x, (tile_ids // 3).to(DEVICE), (tile_ids % 3).to(DEVICE), t, block_tokens=16)
    dense = g.double().t() @ x.double()
    for b, tid in enumerate(tile_ids.tolist()):
        r, c = divmod(tid, 3)
        assert torch.allclose(out[b].double(), dense[r * t:(r + 1) * t, c * t:(c + 1) * t], atol=1e-3)


@pytest.mark.parametrize("shape, k", [((30, 50), 40), ((64, 64), 4096), ((7, 9), 0)])
def test_add_sparse_is_w_plus_s(shape, k):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=gen).to(DEVICE)
    idx = torch.sort(torch.randperm(w.numel(), generator=gen)[:k]).values.to(torch.int32).to(DEVICE)
    vals = torch.randn(k, generator=gen).to(DEVICE)
    ref = w.clone()
    ref.view(-1).index_add_(0, idx, vals)
    out = tk.add_sparse(w, idx, vals, block=128, block_entries=16)
    assert torch.equal(out, ref)


def test_add_sparse_of_a_tile_mask():
    w = torch.randn(64, 96).to(DEVICE)
    idx = select_entries({"w": torch.rand(64 * 96)}, {"w": (64, 96)}, 2048, "global", "tile32")["w"].to(DEVICE)
    vals = torch.randn(idx.numel()).to(DEVICE)
    ref = w.clone()
    ref.view(-1).index_add_(0, idx, vals)
    assert torch.equal(tk.add_sparse(w, idx, vals, block=256, block_entries=64), ref)
