"""The layer: a frozen Linear or Conv1D plus a trainable sparse delta."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .function import sparse_delta_linear
from .layout import IndexLayout, validate_indices, weight_is_transposed
from .weight import WEIGHT_MODES


class SparseDeltaLayer(nn.Module):
    """Wraps a frozen ``nn.Linear`` or GPT-2 ``Conv1D`` with a trainable sparse delta."""

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor | None = None, backend: str = "auto",
                 weight_mode: str = "auto"):
        super().__init__()
        if weight_mode not in WEIGHT_MODES:
            raise ValueError(f"unknown weight mode {weight_mode!r}; choose one of {', '.join(WEIGHT_MODES)}")
        self.base_layer = base_layer
        self.transposed = weight_is_transposed(base_layer)
        self.backend = backend
        self.weight_mode = weight_mode
        base_layer.weight.requires_grad_(False)
        dtype, device = self.weight_dtype, self.weight_device
        if indices is None:
            indices = torch.zeros(0, dtype=torch.int32)
        self.register_buffer("indices", torch.zeros(0, dtype=torch.int32, device=device))
        self.values = nn.Parameter(torch.zeros(0, dtype=dtype, device=device))
        self._layout: IndexLayout | None = None
        self._merged_original: torch.Tensor | None = None
        # Entries dropped by a dynamic schedule with drop_policy="merge": their values are
        # folded into the base weight as W[i] = W0[i] + folded_values[i], always computed
        # from the pristine W0[i] (kept in ``_folded_base``), so that replaying the record
        # on a fresh base model (adapter load) gives the same weight bit for bit.
        self.register_buffer("folded_indices", torch.zeros(0, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("folded_values", torch.zeros(0, dtype=dtype, device=device), persistent=False)
        self.register_buffer("_folded_base", torch.zeros(0, dtype=dtype, device=device), persistent=False)
        # Set by a scorer to receive the dense weight gradient on the next backward.
        self.grad_observer: Callable[[torch.Tensor], None] | None = None
        # An empty trainable parameter kept in the graph, for DDP when nothing dense is
        # trained (sparseft.distributed.add_ddp_anchor); None otherwise.
        self.ddp_anchor: nn.Parameter | None = None
        self.set_indices(indices)

    # -- index surgery ------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    # The weight's geometry without reading the weight (a quantized base would dequantize it).
    @property
    def weight_shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def weight_numel(self) -> int:
        return self.weight.numel()

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def weight_device(self) -> torch.device:
        return self.weight.device

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def num_entries(self) -> int:
        return int(self.indices.numel())

    def set_indices(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Replace the index set in place (the ``values`` Parameter object is kept).

        ``values`` gives the new entries' values (default: zero). Callers that keep
        surviving entries pass them in; the optimizer is updated separately.
        """
        if self._merged_original is not None:
            raise RuntimeError("unmerge the delta before changing its index set")
        indices = validate_indices(indices, self.weight_numel)
        device = self.weight_device
        indices = indices.to(device)
        if values is None:
            values = torch.zeros(indices.numel(), dtype=self.weight_dtype, device=device)
        elif values.shape != indices.shape:
            raise ValueError(f"values has {values.numel()} entries for {indices.numel()} indices")
        self.indices = indices
        # ``set_`` (not ``.data =``): a graph from the last step (e.g. a loss still referenced)
        # keeps the old gradient accumulator alive, and with ``.data =`` it would keep
        # expecting the old size when the number of entries changes.
        with torch.no_grad():
            self.values.set_(values.detach().to(device=device, dtype=self.values.dtype).clone())
        self.values.grad = None
        # Built now, not on first use: a compiled forward then only reads it.
        self._layout = IndexLayout(self.indices, self.weight_shape)

    def _require_whole_weight(self, what: str) -> None:
        # FSDP2 keeps the base weight as a sharded DTensor outside forward: writing entries
        # into it by flat position would need each rank to find its shard's part.
        if hasattr(self.weight, "to_local"):
            raise RuntimeError(
                f"{what} writes into the base weight, which FSDP2 has sharded: not supported "
                "(under FSDP2 use drop_policy='zero'; merge after loading the adapter on an unsharded model)"
            )

    # -- folded (merged-and-dropped) entries ---------------------------------------
    @property
    def num_folded(self) -> int:
        return int(self.folded_indices.numel())

    @torch.no_grad()
    def fold_into_base(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Write dropped entries into the base weight for good (recorded for the adapter).

        A position folded twice accumulates its folded value; the weight is always
        recomputed as ``W0 + folded`` from the pristine ``W0``.
        """
        self._require_whole_weight("folding dropped entries (drop_policy='merge')")
        if self.merged:
            raise RuntimeError("unmerge the delta before folding entries into the base weight")
        indices = validate_indices(indices, self.weight.numel()).to(self.weight.device)
        if indices.numel() == 0:
            return
        values = values.detach().to(device=self.weight.device, dtype=self.weight.dtype)
        flat = self.weight.view(-1)
        old_idx = self.folded_indices
        union = torch.unique(torch.cat([old_idx, indices]).long()).to(torch.int32)  # sorted
        folded = torch.zeros(union.numel(), dtype=self.weight.dtype, device=union.device)
        base = torch.empty_like(folded)
        old_pos = torch.searchsorted(union, old_idx)
        folded[old_pos] = self.folded_values
        base[old_pos] = self._folded_base
        is_new = ~torch.isin(union, old_idx)
        base[is_new] = flat[union[is_new].long()]  # never folded before: W there is still W0
        folded[torch.searchsorted(union, indices)] += values
        self.folded_indices, self.folded_values, self._folded_base = union, folded, base
        flat[union.long()] = base + folded

    @torch.no_grad()
    def set_folded(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Apply a saved fold record to a pristine base weight (adapter load)."""
        self._require_whole_weight('replaying folded entries')
        if self.merged or self.num_folded:
            raise RuntimeError("set_folded needs a pristine, unmerged base weight")
        indices = validate_indices(indices, self.weight.numel()).to(self.weight.device)
        if values.shape != indices.shape:
            raise ValueError(f"folded values has {values.numel()} entries for {indices.numel()} indices")
        flat = self.weight.view(-1)
        values = values.detach().to(device=self.weight.device, dtype=self.weight.dtype).clone()
        base = flat[indices.long()].clone()
        self.folded_indices, self.folded_values, self._folded_base = indices, values, base
        flat[indices.long()] = base + values

    @torch.no_grad()
    def restore_base(self) -> None:
        """Undo every fold: the base weight is W0 again, bit for bit."""
        if self.merged:
            raise RuntimeError("unmerge the delta before restoring the base weight")
        if self.num_folded:
            self.weight.view(-1)[self.folded_indices.long()] = self._folded_base
        empty = self.folded_indices[:0]
        self.folded_indices, self.folded_values, self._folded_base = empty, self.folded_values[:0], self._folded_base[:0]

    @property
    def layout(self) -> IndexLayout:
        if self._layout is None or self._layout.indices is not self.indices:
            self._layout = IndexLayout(self.indices, self.weight_shape)
        return self._layout

    def _apply(self, fn, recurse=True):  # keep the cached layout on the module's device
        self._layout = None
        out = super()._apply(fn, recurse)
        self._layout = IndexLayout(self.indices, self.weight_shape)
        return out

    # -- compute ------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged_original is not None:
            return self.base_layer(x)
        if self.num_entries == 0 and self.grad_observer is None:
            out = self.base_layer(x)
            if self.values.requires_grad and torch.is_grad_enabled():
                # Keep the (empty) values in the graph: every values parameter then gets a
                # gradient (an empty one here) in every backward pass, on every rank.
                out = out + self.values.sum()
        else:
            out = sparse_delta_linear(x, self.weight, self.base_layer.bias, self.values, self.layout, self.transposed,
                                      self.backend, self.weight_mode, self.grad_observer)
        if self.ddp_anchor is not None and torch.is_grad_enabled():
            out = out + self.ddp_anchor.sum()  # an empty sum: 0, so the output is unchanged
        return out

    def delta_weight(self) -> torch.Tensor:
        """The dense delta S (same shape and layout as the base weight)."""
        delta = torch.zeros_like(self.weight)
        delta.view(-1).index_add_(0, self.indices, self.values.detach().to(delta.dtype))
        return delta

    # -- merge --------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return self._merged_original is not None

    @torch.no_grad()
    def merge(self) -> None:
        """Write the delta into the base weight; ``unmerge`` restores it exactly."""
        self._require_whole_weight('merge')
        if self.merged:
            return
        flat = self.weight.view(-1)
        original = flat.index_select(0, self.indices.long()).clone()
        flat.index_add_(0, self.indices, self.values.to(flat.dtype))
        self._merged_original = original

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.view(-1).index_copy_(0, self.indices.long(), self._merged_original)
        self._merged_original = None

    def extra_repr(self) -> str:
        return f"entries={self.num_entries}, weight={tuple(self.weight.shape)}, transposed={self.transposed}"
