"""How a flat int32 index over a weight is checked and laid out for the kernels."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..blocksparse import TileLayout


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D (weight stored as ``in x out``), detected without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def weight_is_transposed(module: nn.Module) -> bool:
    return is_conv1d(module)


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """The shape of a Linear's or Conv1D's weight as a float matrix (a quantized layer's
    packed weight has another shape)."""
    from .. import quant

    if quant.is_quantized(module):
        return quant.weight_shape(module)
    return tuple(module.weight.shape)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D."""
    rows, cols = weight_shape(module)
    return (cols, rows) if weight_is_transposed(module) else (rows, cols)


class IndexLayout:
    """Derived forms of a flat index that the kernels want; rebuilt when the index changes.

    ``crow``/``col`` (int32) are the CSR pattern for ``sampled_addmm`` and the compiled
    kernel: 4 bytes per entry beside the int32 index, built at once. ``rows`` (int32) the row
    of each entry (gather backend) and ``flat_long`` the index as int64 (``index_copy_``
    wants it, for the in-place weight mode of a float base) are built at their first use and
    kept: 12 bytes per entry more where they are used, nothing where they are not (a
    quantized base never uses ``flat_long``, and ``rows`` only for tiny layers' gather).
    A weight with fewer rows than columns also gets, at its first CPU SDDMM with two threads
    or more, the pattern of its transpose and the way back to index order
    (``transposed()``): 16 bytes more per entry.
    """

    def __init__(self, indices: torch.Tensor, weight_shape: torch.Size | tuple[int, int],
                 parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        rows_n, cols_n = weight_shape
        self.weight_shape = (int(rows_n), int(cols_n))
        self.numel = int(indices.numel())
        self.device = indices.device
        self.indices = indices
        # A full index (sorted, unique, as many as the weight's entries) is 0..n-1: the
        # values' gradient is then the dense weight gradient itself, one matmul, and the
        # row/column buffers are not built. Dense-silo methods (DST) use this.
        self.full = self.numel == rows_n * cols_n and self.numel > 0
        # Built on demand by transposed(); not for the throwaway layouts inside custom ops.
        self._transposed: tuple[IndexLayout, torch.Tensor] | None = None
        self.keeps_derived = parts is None
        # Tile coordinates when the index is whole aligned tiles (blocksparse.py); not for
        # the throwaway layouts inside custom ops.
        self.tiles: TileLayout | None = None
        if parts is not None:  # already built (inside the custom op)
            self.crow, self.col, self._rows, self._flat_long = parts
            return
        empty = indices.new_zeros(0)
        if self.full or self.numel == 0:
            self.crow, self.col, self._rows, self._flat_long = empty, empty, empty, empty.long()
            return
        # Row by row, in int32 chunks: no int64 copy of the whole index, even transiently.
        counts = torch.bincount(torch.div(indices, cols_n, rounding_mode="floor"), minlength=rows_n)
        crow = torch.zeros(rows_n + 1, dtype=torch.int32, device=indices.device)
        crow[1:] = counts.cumsum(0)
        self.crow = crow
        self.col = torch.remainder(indices, cols_n).to(torch.int32)
        self._rows: torch.Tensor | None = None
        self._flat_long: torch.Tensor | None = None
        self.tiles = TileLayout.detect(indices, self.weight_shape)

    @property
    def rows(self) -> torch.Tensor:
        if self._rows is None:
            self._rows = torch.div(self.indices, self.weight_shape[1], rounding_mode="floor").to(torch.int32)
        return self._rows

    @property
    def flat_long(self) -> torch.Tensor:
        if self._flat_long is None:
            self._flat_long = self.indices.long()
        return self._flat_long

    @property
    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.crow, self.col, self.rows, self.flat_long

    def transposed(self) -> tuple[IndexLayout, torch.Tensor]:
        """The layout of the same entries in the transposed weight (cols x rows), for the
        SDDMM only (no int64 index), and the int32 positions ``back`` such that
        ``values_t.index_select(0, back)`` is in this layout's order."""
        if self._transposed is None:
            rows_n, cols_n = self.weight_shape
            flat = self.indices.long()  # transient: not kept as flat_long
            flat_t = (flat % cols_n) * rows_n + flat // cols_n
            del flat
            order = torch.argsort(flat_t)
            back = torch.empty(order.numel(), dtype=torch.int32, device=order.device)
            back[order] = torch.arange(order.numel(), dtype=torch.int32, device=order.device)
            layout_t = IndexLayout(flat_t[order].to(torch.int32), (cols_n, rows_n))
            self._transposed = (layout_t, back)
        return self._transposed



def validate_indices(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """Check that an index buffer is 1-D int32, sorted, unique and within ``numel``."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int32:
        if indices.dtype in (torch.int64, torch.int16, torch.int8, torch.uint8):
            if indices.numel() and (int(indices.max()) >= 2**31 or int(indices.min()) < 0):
                raise ValueError("indices fall outside the int32 range")
            indices = indices.to(torch.int32)
        else:
            raise ValueError(f"indices must be integers, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
    if indices.numel():
        if int(indices.min()) < 0 or int(indices.max()) >= numel:
            raise ValueError(f"indices must lie in [0, {numel}), got range [{int(indices.min())}, {int(indices.max())}]")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise ValueError("indices must be sorted and unique")
    return indices
