"""The sparse delta: a frozen weight plus trainable values at a sorted int32 index.

The effective weight of a wrapped layer is ``W + scatter(indices, values)``. The
autograd function below never builds the dense weight gradient on an ordinary step:
the values' gradient is a sampled dense-dense matmul (SDDMM) over the index only.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# Largest (tokens x entries) product the gather backend materialises at once.
GATHER_CHUNK_ELEMENTS = 1 << 24
# Below this many (tokens x entries) multiply-adds the gather backend beats sampled_addmm,
# which pays for transposing both operands into token-contiguous layouts first.
GATHER_AUTO_LIMIT = 1 << 21
# On CUDA in fp32, above this many (tokens x weight entries) the dense weight-gradient
# matmul costs more than sampled_addmm (measured between SmolLM2 and a 1.2 B Llama).
DENSE_FP32_LIMIT = 1 << 33



def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D (weight stored as ``in x out``), detected without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def weight_is_transposed(module: nn.Module) -> bool:
    return is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D."""
    rows, cols = module.weight.shape
    return (cols, rows) if weight_is_transposed(module) else (rows, cols)


class IndexLayout:
    """Derived forms of a flat index that the kernels want; rebuilt when the index changes."""

    def __init__(self, indices: torch.Tensor, weight_shape: torch.Size):
        rows_n, cols_n = weight_shape
        self.weight_shape = (rows_n, cols_n)
        self.numel = int(indices.numel())
        self.device = indices.device
        # A full index (sorted, unique, as many as the weight's entries) is 0..n-1: the
        # values' gradient is then the dense weight gradient itself, one matmul, and the
        # row/column buffers (16 bytes per entry) are not built. Dense-silo methods (DST)
        # use this.
        self.full = self.numel == rows_n * cols_n and self.numel > 0
        if self.full:
            return
        flat = indices.long()
        self.rows = flat // cols_n
        self.cols = flat % cols_n
        counts = torch.bincount(self.rows, minlength=rows_n)
        crow = torch.zeros(rows_n + 1, dtype=torch.int32, device=indices.device)
        crow[1:] = counts.cumsum(0)
        self.crow = crow
        self.col = self.cols.to(torch.int32)
        self.flat = flat


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def sddmm(row_factor: torch.Tensor, col_factor: torch.Tensor, layout: IndexLayout, backend: str) -> torch.Tensor:
    """grad[i] = sum_t row_factor[t, rows[i]] * col_factor[t, cols[i]] for every index entry.

    ``row_factor`` is (tokens x weight rows), ``col_factor`` is (tokens x weight cols).
    """
    if layout.numel == 0:
        return row_factor.new_zeros(0)
    if layout.full:
        # Every entry is indexed, in flat order: the dense weight gradient is the answer.
        return row_factor.t().matmul(col_factor).reshape(-1)
    tokens = row_factor.shape[0]
    if backend == "auto":
        if row_factor.is_cuda:
            # On a GPU the dense weight gradient is one matmul; reading k entries from it beat
            # cuSPARSE's SDDMM at every shape measured (bench/results/gpu) except large fp32
            # weights, where the matmul runs without tensor cores (1.2 B Llama, fp32).
            large_fp32 = row_factor.dtype == torch.float32 and tokens * layout.weight_shape[0] * layout.weight_shape[1] > DENSE_FP32_LIMIT
            backend = "sampled_addmm" if large_fp32 else "dense"
        else:
            backend = "gather" if tokens * layout.numel <= GATHER_AUTO_LIMIT else "sampled_addmm"
    out_dtype = row_factor.dtype
    if backend == "dense":
        # Transient: one weight-sized buffer, freed as soon as the entries are read.
        return row_factor.t().matmul(col_factor).view(-1).index_select(0, layout.flat)
    if backend == "sampled_addmm":
        if row_factor.dtype not in (torch.float32, torch.float64):
            # sampled_addmm has no bf16 kernel (CPU or CUDA) in the torch versions we support: upcast.
            row_factor, col_factor = row_factor.float(), col_factor.float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "CSR support is in beta": said once per process, not useful here
            pattern = torch.sparse_csr_tensor(
                layout.crow, layout.col, row_factor.new_zeros(layout.numel), size=layout.weight_shape,
                check_invariants=False,  # the layout is built from validated, sorted, unique indices
            )
        # Both operands token-contiguous: each sampled entry is one contiguous dot product.
        mat1 = row_factor.t().contiguous()
        mat2 = col_factor.t().contiguous().t()
        return torch.sparse.sampled_addmm(pattern, mat1, mat2, beta=0.0).values().to(out_dtype)
    if backend != "gather":
        raise ValueError(f"unknown SDDMM backend {backend!r}")
    # Gather with an fp32 accumulator, chunked so memory stays bounded.
    acc_dtype = torch.float32 if row_factor.dtype in (torch.float16, torch.bfloat16) else row_factor.dtype
    out = torch.empty(layout.numel, dtype=acc_dtype, device=row_factor.device)
    chunk = max(1, GATHER_CHUNK_ELEMENTS // max(tokens, 1))
    for start in range(0, layout.numel, chunk):
        r = layout.rows[start:start + chunk]
        c = layout.cols[start:start + chunk]
        prod = row_factor.index_select(1, r).to(acc_dtype) * col_factor.index_select(1, c).to(acc_dtype)
        out[start:start + chunk] = prod.sum(0)
    return out.to(out_dtype)


def effective_weight(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """W + scatter(indices, values), in a fresh buffer (W itself is never touched).

    With no entries (a layer only observed for scoring) this is W itself: no copy.
    """
    if values.numel() == 0:
        return weight.detach()
    merged = weight.detach().clone()
    if values.numel() == weight.numel():
        merged.view(-1).add_(values.detach().to(weight.dtype))  # a full index is 0..n-1 (validated)
    elif values.numel():
        merged.view(-1).index_add_(0, indices, values.detach().to(weight.dtype))
    return merged


class SparseDeltaFunction(torch.autograd.Function):
    """y = x @ (W + S)^T + b for Linear, y = x @ (W + S) + b for Conv1D."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, layout, transposed, backend, grad_observer):
        w_eff = effective_weight(weight, indices, values)
        if transposed:
            # Same kernel as transformers' Conv1D (addmm), so zero values give bit-identical outputs.
            x2 = _as_2d(x)
            out = torch.addmm(bias, x2, w_eff) if bias is not None else x2.matmul(w_eff)
            out = out.view(*x.shape[:-1], w_eff.shape[-1])
        else:
            out = F.linear(x, w_eff, bias)
        ctx.save_for_backward(x, weight, values, indices)
        ctx.layout = layout
        ctx.transposed = transposed
        ctx.backend = backend
        ctx.has_bias = bias is not None
        ctx.grad_observer = grad_observer
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, values, indices = ctx.saved_tensors
        needs_x, _, needs_bias, needs_values = ctx.needs_input_grad[:4]
        grad_x = grad_bias = grad_values = None
        if needs_x:
            # Recomputing W + S is one add per entry: cheaper than keeping a dense copy alive.
            w_eff = effective_weight(weight, indices, values)
            grad_x = grad_out.matmul(w_eff) if not ctx.transposed else grad_out.matmul(w_eff.t())
        g2 = _as_2d(grad_out)
        x2 = _as_2d(x)
        # Weight rows are outputs for Linear (W: out x in) and inputs for Conv1D (W: in x out).
        row_factor, col_factor = (x2, g2) if ctx.transposed else (g2, x2)
        if needs_values:
            grad_values = sddmm(row_factor, col_factor, ctx.layout, ctx.backend).to(values.dtype)
        if needs_bias and ctx.has_bias:
            grad_bias = g2.sum(0)
        if ctx.grad_observer is not None:
            # Only selection steps ask for this: the dense gradient of the frozen weight.
            ctx.grad_observer(row_factor.t().matmul(col_factor))
        return grad_x, None, grad_bias, grad_values, None, None, None, None, None


class SparseDeltaLayer(nn.Module):
    """Wraps a frozen ``nn.Linear`` or GPT-2 ``Conv1D`` with a trainable sparse delta."""

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor | None = None, backend: str = "auto"):
        super().__init__()
        self.base_layer = base_layer
        self.transposed = weight_is_transposed(base_layer)
        self.backend = backend
        weight = base_layer.weight
        weight.requires_grad_(False)
        if indices is None:
            indices = torch.zeros(0, dtype=torch.int32)
        self.register_buffer("indices", torch.zeros(0, dtype=torch.int32, device=weight.device))
        self.values = nn.Parameter(torch.zeros(0, dtype=weight.dtype, device=weight.device))
        self._layout: IndexLayout | None = None
        self._merged_original: torch.Tensor | None = None
        # Entries dropped by a dynamic schedule with drop_policy="merge": their values are
        # folded into the base weight as W[i] = W0[i] + folded_values[i], always computed
        # from the pristine W0[i] (kept in ``_folded_base``), so that replaying the record
        # on a fresh base model (adapter load) gives the same weight bit for bit.
        self.register_buffer("folded_indices", torch.zeros(0, dtype=torch.int32, device=weight.device), persistent=False)
        self.register_buffer("folded_values", torch.zeros(0, dtype=weight.dtype, device=weight.device), persistent=False)
        self.register_buffer("_folded_base", torch.zeros(0, dtype=weight.dtype, device=weight.device), persistent=False)
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
        indices = validate_indices(indices, self.weight.numel())
        device = self.weight.device
        indices = indices.to(device)
        if values is None:
            values = torch.zeros(indices.numel(), dtype=self.weight.dtype, device=device)
        elif values.shape != indices.shape:
            raise ValueError(f"values has {values.numel()} entries for {indices.numel()} indices")
        self.indices = indices
        # ``set_`` (not ``.data =``): a graph from the last step (e.g. a loss still referenced)
        # keeps the old gradient accumulator alive, and with ``.data =`` it would keep
        # expecting the old size when the number of entries changes.
        with torch.no_grad():
            self.values.set_(values.detach().to(device=device, dtype=self.values.dtype).clone())
        self.values.grad = None
        self._layout = None

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
        if self._layout is None or self._layout.device != self.indices.device:
            self._layout = IndexLayout(self.indices, self.weight.shape)
        return self._layout

    def _apply(self, fn, recurse=True):  # keep the cached layout on the module's device
        self._layout = None
        return super()._apply(fn, recurse)

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
            bias = self.base_layer.bias
            out = SparseDeltaFunction.apply(
                x, self.weight, bias, self.values, self.indices, self.layout,
                self.transposed, self.backend, self.grad_observer,
            )
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
