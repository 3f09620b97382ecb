"""The values' gradient of a tile-structured index set as a batch of small dense matmuls.

When a layer's index is exactly the entries of whole, aligned t x t tiles (``tiles.py``),
the SDDMM ``grad[i] = sum_t G[t, row_i] * X[t, col_i]`` regroups into one matmul per
tile, ``G[:, tile rows]^T @ X[:, tile cols]`` (t x tokens x t): every loaded element is
used t times, where the element-wise SDDMM uses it once. On CPU the compiled kernel
(``csrc/sddmm.c``) accumulates each tile in registers straight from the token-major
operands; on CUDA with Triton installed, the Triton kernel (``triton_kernels.py``);
elsewhere (float64, a double backward, CUDA without Triton) ``torch.bmm`` over gathered
blocks. ``TileLayout`` recognises such
an index (t = 32 first, then 16) and keeps what the batched matmul needs; ``tile_sddmm``
computes the gradient in the index's own (flat, sorted) order.
"""
from __future__ import annotations

import torch

from . import native
from .tiles import is_tiled, tile_grid

# Tile sides tried, largest first: a 32-tiled index is also 16-tiled, and larger tiles
# reuse each loaded element more.
TILE_SIDES = (32, 16)


class TileLayout:
    """Tile coordinates of a tiled index and the permutation back to flat order.

    ``rows``/``cols`` (int64, one per tile, in row-major tile order) are the tile's block
    row and column; ``order`` (int64, one per entry) gives, for the i-th entry of the flat
    index, its position in the tile-major result ``(tiles x t x t)``.
    """

    def __init__(self, indices: torch.Tensor, shape: tuple[int, int], t: int):
        rows_n, cols_n = shape
        self.t = t
        self.shape = (int(rows_n), int(cols_n))
        _, tc = tile_grid(self.shape, t)
        flat = indices.long()
        r, c = flat // cols_n, flat % cols_n
        tile_id = (r // t) * tc + c // t
        ids = torch.unique(tile_id)  # sorted
        self.num_tiles = int(ids.numel())
        self.rows = ids // tc
        self.cols = ids % tc
        rank = torch.searchsorted(ids, tile_id)
        self.order = rank * (t * t) + (r % t) * t + (c % t)

    @classmethod
    def detect(cls, indices: torch.Tensor, shape: tuple[int, int]) -> "TileLayout | None":
        for t in TILE_SIDES:
            if is_tiled(indices, shape, t):
                return cls(indices, shape, t)
        return None


def _triton():
    """The Triton kernels module when triton is installed, else None (imported on first
    CUDA use only: importing triton takes a while)."""
    from . import triton_kernels

    return triton_kernels if triton_kernels.available() else None


def tile_sddmm(row_factor: torch.Tensor, col_factor: torch.Tensor, tiles: TileLayout) -> torch.Tensor:
    """grad[i] = sum_t row_factor[t, rows[i]] * col_factor[t, cols[i]] for a tiled index, in
    the index's order. ``row_factor``: tokens x weight rows; ``col_factor``: tokens x weight
    cols."""
    t = tiles.t
    tokens = row_factor.shape[0]
    differentiable = torch.is_grad_enabled() and (row_factor.requires_grad or col_factor.requires_grad)
    lib = None if differentiable or not native.supports(row_factor, col_factor) else native.library()
    if lib is not None:
        blocks = native.tile_sddmm(row_factor, col_factor, tiles.rows, tiles.cols, t, lib)
        return blocks.reshape(-1).index_select(0, tiles.order).to(row_factor.dtype)
    if row_factor.is_cuda and not differentiable and _triton() is not None:
        blocks = _triton().tile_sddmm(row_factor, col_factor, tiles.rows, tiles.cols, t)
        return blocks.reshape(-1).index_select(0, tiles.order).to(row_factor.dtype)
    # (tokens, blocks, t) views; index_select along the block axis copies each token's t
    # contiguous features per tile, then one batched matmul over the tiles.
    g = row_factor.reshape(tokens, -1, t).index_select(1, tiles.rows).transpose(0, 1)  # tiles x tokens x t
    x = col_factor.reshape(tokens, -1, t).index_select(1, tiles.cols).transpose(0, 1)
    blocks = torch.bmm(g.transpose(1, 2), x)  # tiles x t x t
    return blocks.reshape(-1).index_select(0, tiles.order)
