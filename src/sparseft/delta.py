"""The sparse delta: a frozen weight plus trainable values at a sorted int32 index.

The effective weight of a wrapped layer is ``W + scatter(indices, values)``. The
autograd function below never builds the dense weight gradient on an ordinary step:
the values' gradient is a sampled dense-dense matmul (SDDMM) over the index only.
"""
from __future__ import annotations

import threading
import weakref
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import native

# Largest (tokens x entries) product the gather backend materialises at once.
GATHER_CHUNK_ELEMENTS = 1 << 24
# The CPU SDDMM backend choice ("auto"): a cost model fitted on bench/bench_sddmm_backends.py
# (bench/results/quiet/sddmm_backends.json), in nanoseconds at 1-2 threads:
#   gather         ~1.7 per (token x entry), plus little else;
#   sampled_addmm  ~1.3 per (token x (rows + cols)) for transposing both operands into
#                  token-contiguous layouts, ~0.2 per (token x entry), ~80 us fixed.
# Gather's (tokens x entries) products leave the cache above GATHER_AUTO_LIMIT: never there.
GATHER_AUTO_LIMIT = 1 << 21
GATHER_NS_PER_PRODUCT = 1.7
SAMPLED_NS_PER_PRODUCT = 0.2
SAMPLED_NS_PER_TRANSPOSED = 1.3
SAMPLED_FIXED_NS = 80_000
# Where the compiled kernel (native.py) is built, "auto" takes it for CPU float SDDMMs:
# 0.14-0.47x sampled_addmm's time in all 17 cases of that bench at 1 and 2 threads. It
# transposes every feature, so with fewer entries than a tenth of (rows + cols) gather,
# which reads only the entries' features, is as fast or faster (up to 1.5x at 1 thread).
NATIVE_GATHER_ENTRIES_PER_FEATURE = 0.1
# On CUDA in fp32, above this many (tokens x weight entries) the dense weight-gradient
# matmul costs more than sampled_addmm (measured between SmolLM2 and a 1.2 B Llama).
DENSE_FP32_LIMIT = 1 << 33


def gather_is_cheaper(tokens: int, entries: int, rows: int, cols: int) -> bool:
    """Whether ``auto`` takes the gather backend over sampled_addmm on CPU, when the compiled
    kernel is unavailable (see the cost model above)."""
    products = tokens * entries
    if products > GATHER_AUTO_LIMIT:
        return False
    gather = GATHER_NS_PER_PRODUCT * products
    sampled = SAMPLED_NS_PER_TRANSPOSED * tokens * (rows + cols) + SAMPLED_NS_PER_PRODUCT * products + SAMPLED_FIXED_NS
    return gather < sampled


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
    """Derived forms of a flat index that the kernels want; rebuilt when the index changes.

    ``crow``/``col`` (int32) are the CSR pattern for ``sampled_addmm``, ``rows`` (int32) the
    row of each entry (gather backend), ``flat_long`` the index as int64 (``index_copy_``
    wants it, for the in-place weight mode): 16 bytes per entry beside the int32 index.
    A weight with fewer rows than columns also gets, at its first CPU SDDMM, the pattern of
    its transpose and the way back to index order (``transposed()``): 16 bytes more per entry.
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
        if parts is not None:  # already built (inside the custom op)
            self.crow, self.col, self.rows, self.flat_long = parts
            return
        empty = indices.new_zeros(0)
        if self.full or self.numel == 0:
            self.crow, self.col, self.rows, self.flat_long = empty, empty, empty, empty.long()
            return
        flat = indices.long()
        rows = flat // cols_n
        counts = torch.bincount(rows, minlength=rows_n)
        crow = torch.zeros(rows_n + 1, dtype=torch.int32, device=indices.device)
        crow[1:] = counts.cumsum(0)
        self.crow = crow
        self.col = (flat % cols_n).to(torch.int32)
        self.rows = rows.to(torch.int32)
        self.flat_long = flat

    @property
    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.crow, self.col, self.rows, self.flat_long

    def transposed(self) -> tuple[IndexLayout, torch.Tensor]:
        """The layout of the same entries in the transposed weight (cols x rows), for the
        SDDMM only (no int64 index), and the int32 positions ``back`` such that
        ``values_t.index_select(0, back)`` is in this layout's order."""
        if self._transposed is None:
            rows_n, cols_n = self.weight_shape
            flat_t = (self.flat_long % cols_n) * rows_n + self.flat_long // cols_n
            order = torch.argsort(flat_t)
            back = torch.empty(order.numel(), dtype=torch.int32, device=order.device)
            back[order] = torch.arange(order.numel(), dtype=torch.int32, device=order.device)
            layout_t = IndexLayout(flat_t[order].to(torch.int32), (cols_n, rows_n))
            layout_t.flat_long = layout_t.flat_long[:0]  # only the in-place weight mode and dense SDDMM read it
            self._transposed = (layout_t, back)
        return self._transposed


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


# The SDDMM's two transposes go into reused per-thread buffers (False: fresh tensors each call).
TRANSPOSE_SCRATCH = True
# sampled_addmm over blocks of about this many tokens (0: all at once), accumulating. Transposing
# a (tokens x n) block whose length is a multiple of 1024 floats (e.g. 2048 tokens) makes the
# transposed rows alias in the cache; blocks of ~300 tokens avoid that and stay in cache
# (1 thread, CPU time, 2048 tokens, 3 % density: SDDMM 0.55-0.8x of the unblocked one; the
# MiniLM step 0.92x, bench/results/variants_minilm_chunk_cpu1.json). Each block is one more
# parallel region: on a machine whose other core is busy that can cost more than it saves.
SDDMM_TOKEN_CHUNK = 293
# On CPU with more than one thread, sampled_addmm runs once over a batch of token blocks of
# about this many tokens (0: the chunked loop above instead). Each operand is reordered into
# (blocks x features x block tokens) by one strided copy, which torch runs on every thread,
# where the 2-D transposes above take torch's single-threaded transpose path; one batched
# call then replaces a call per chunk. MiniLM's and SmolLM2's layers, 2 threads: 0.74-0.97x
# the chunked loop's time; with 1 thread the chunked loop is as fast or faster (up to 1.3x),
# so it stays there (bench/bench_sddmm_blocks.py, bench/results/quiet/sddmm_blocks*.json).
SDDMM_TOKEN_BLOCK = 256
SDDMM_BLOCKS_MIN_THREADS = 2
SDDMM_CALL_MAX_TOKENS = 8192
# A weight with fewer rows than columns runs the batched call on its transpose (see sddmm).
SDDMM_TRANSPOSE_WIDE = True
_TRANSPOSE_SCRATCH = threading.local()
_CPU_FP32 = torch.empty(0)  # what the compiled kernel's working buffers are (see _scratch_flat)


def _scratch_flat(slot: str, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A reused per-thread buffer of at least ``numel`` elements (grown as needed); valid
    until the next call for the same slot."""
    bufs = _TRANSPOSE_SCRATCH.__dict__.setdefault("bufs", {})
    key = (slot, like.dtype, like.device)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel]


# Per thread and slot, the last reordered operand whose owner (the layer input it views) was
# named: (weak reference to the owner, what was reordered, the reordered view). Layers fed the
# same input (q, k and v) then reorder it once per backward instead of three times.
_REORDERED = threading.local()


def _token_blocked(a: torch.Tensor, n_blocks: int, slot: str, owner: torch.Tensor | None = None) -> torch.Tensor:
    """The first ``n_blocks * block`` rows of ``a`` (tokens x features) as (n_blocks x features
    x block), each block's tokens contiguous, in a reused per-thread buffer (valid until the
    next call for the same slot). With ``owner`` (the tensor ``a`` views), a call for the same
    view of the same, unmodified owner returns the previous result without copying again."""
    last = _REORDERED.__dict__.setdefault("last", {})
    previous = last.pop(slot, None)
    key = (a.data_ptr(), tuple(a.shape), a.stride(), a.dtype, n_blocks, owner._version if owner is not None else -1)
    if owner is not None and previous is not None and previous[0]() is owner and previous[1] == key:
        last[slot] = previous
        return previous[2]
    block = a.shape[0] // n_blocks
    out = _scratch_flat(slot, n_blocks * a.shape[1] * block, a).view(n_blocks, a.shape[1], block)
    out.copy_(a[:n_blocks * block].view(n_blocks, block, a.shape[1]).transpose(1, 2))
    if owner is not None:
        last[slot] = (weakref.ref(owner), key, out)
    return out


def _sampled_addmm_token_blocks(row_factor: torch.Tensor, col_factor: torch.Tensor, layout: IndexLayout,
                                n_blocks: int, row_owner: torch.Tensor | None = None,
                                col_owner: torch.Tensor | None = None) -> torch.Tensor:
    """The SDDMM as one batched sampled_addmm over ``n_blocks`` token blocks, summed over the
    blocks; the last ``tokens % n_blocks`` tokens (fewer than ``n_blocks``) are added apart."""
    tokens = row_factor.shape[0]
    used = tokens // n_blocks * n_blocks
    pattern = torch.sparse_csr_tensor(
        layout.crow.expand(n_blocks, -1), layout.col.expand(n_blocks, -1),
        row_factor.new_zeros(n_blocks, layout.numel), size=(n_blocks, *layout.weight_shape),
        check_invariants=False,
    )
    mat1 = _token_blocked(row_factor, n_blocks, "row-blocks", row_owner)
    mat2 = _token_blocked(col_factor, n_blocks, "col-blocks", col_owner).transpose(1, 2)
    out = torch.sparse.sampled_addmm(pattern, mat1, mat2, beta=0.0).values().sum(0)
    if used < tokens:
        out += sddmm(row_factor[used:], col_factor[used:], layout, "auto")
    return out


def _transposed_into_scratch(a: torch.Tensor, slot: str) -> torch.Tensor:
    """``a.t().contiguous()`` written into a reused per-thread buffer (one per slot, grown
    as needed). The result is only valid until the next call for the same slot."""
    out = _scratch_flat(slot, a.numel(), a).view(a.shape[1], a.shape[0])
    out.copy_(a.t())
    return out


def release_scratch() -> None:
    """Free this thread's reused buffers (W + S scratch and SDDMM transposes)."""
    _TRANSPOSE_SCRATCH.__dict__.pop("bufs", None)
    _REORDERED.__dict__.pop("last", None)
    _SCRATCH.__dict__.pop("bufs", None)


def _native_kernel(row_factor: torch.Tensor, col_factor: torch.Tensor):
    """The compiled CPU kernel if it takes these factors (CPU floats, not under a double
    backward: it has no derivative) and is built, else None."""
    differentiable = torch.is_grad_enabled() and (row_factor.requires_grad or col_factor.requires_grad)
    if differentiable or not native.supports(row_factor, col_factor):
        return None
    return native.library()


def sddmm(row_factor: torch.Tensor, col_factor: torch.Tensor, layout: IndexLayout, backend: str,
          row_owner: torch.Tensor | None = None, col_owner: torch.Tensor | None = None) -> torch.Tensor:
    """grad[i] = sum_t row_factor[t, rows[i]] * col_factor[t, cols[i]] for every index entry.

    ``row_factor`` is (tokens x weight rows), ``col_factor`` is (tokens x weight cols).
    ``row_owner`` / ``col_owner``: the tensor a factor is a view of (the layer's input), which
    lets consecutive calls on the same input share its reordering (CPU, batched blocks path).
    """
    if layout.numel == 0:
        return row_factor.new_zeros(0)
    if layout.full:
        # Every entry is indexed, in flat order: the dense weight gradient is the answer.
        return row_factor.t().matmul(col_factor).reshape(-1)
    tokens = row_factor.shape[0]
    kernel = None
    if backend == "auto":
        if row_factor.is_cuda:
            # On a GPU the dense weight gradient is one matmul; reading k entries from it beat
            # cuSPARSE's SDDMM at every shape measured (bench/results/gpu) except large fp32
            # weights, where the matmul runs without tensor cores (1.2 B Llama, fp32).
            large_fp32 = row_factor.dtype == torch.float32 and tokens * layout.weight_shape[0] * layout.weight_shape[1] > DENSE_FP32_LIMIT
            backend = "sampled_addmm" if large_fp32 else "dense"
        else:
            rows, cols = layout.weight_shape
            kernel = _native_kernel(row_factor, col_factor)
            if kernel is None:
                backend = "gather" if gather_is_cheaper(tokens, layout.numel, rows, cols) else "sampled_addmm"
            elif (layout.numel < NATIVE_GATHER_ENTRIES_PER_FEATURE * (rows + cols)
                  and tokens * layout.numel <= GATHER_AUTO_LIMIT):
                backend = "gather"
            else:
                backend = "native"
    out_dtype = row_factor.dtype
    if backend == "native":
        if kernel is None:  # asked for by name, not chosen by auto above
            kernel = _native_kernel(row_factor, col_factor)
        if kernel is not None:
            return native.sddmm(row_factor, col_factor, layout.crow, layout.col, layout.weight_shape, kernel,
                                lambda slot, n: _scratch_flat(slot, n, _CPU_FP32)).to(out_dtype)
        if native.library() is None:
            raise ValueError("SDDMM backend 'native': the compiled CPU kernel is unavailable "
                             "(see the warning above, or SPARSEFT_NATIVE); use 'auto'")
        # CUDA tensors, float64, or a double backward: torch's path gives the same numbers.
        backend = "dense" if row_factor.is_cuda else "sampled_addmm"
    if backend == "dense":
        # Transient: one weight-sized buffer, freed as soon as the entries are read.
        return row_factor.t().matmul(col_factor).view(-1).index_select(0, layout.flat_long)
    if backend == "sampled_addmm":
        if row_factor.dtype not in (torch.float32, torch.float64):
            # sampled_addmm has no bf16 kernel (CPU or CUDA) in the torch versions we support: upcast.
            row_factor, col_factor = row_factor.float(), col_factor.float()
            row_owner = col_owner = None  # fresh copies: their addresses say nothing about the owner's view
        on_cpu = row_factor.device.type == "cpu"
        # Not under a double backward (factors that require grad): batched sampled_addmm has
        # no derivative, and reused buffers must not enter a graph.
        differentiable = torch.is_grad_enabled() and (row_factor.requires_grad or col_factor.requires_grad)
        if (SDDMM_TOKEN_BLOCK and TRANSPOSE_SCRATCH and on_cpu and not differentiable
                and torch.get_num_threads() >= SDDMM_BLOCKS_MIN_THREADS):
            rows, cols = layout.weight_shape
            if rows < cols and SDDMM_TRANSPOSE_WIDE and layout.keeps_derived:
                # The same entries as the transposed problem: sampled_addmm keeps each row's
                # operand in cache while it walks that row's entries, and runs faster when
                # the other operand, read at random, is the narrower one (384 x 1536 at 2,048
                # tokens: ~0.85x; bench/bench_sddmm_blocks.py, its "as is" column).
                layout_t, back = layout.transposed()
                values_t = sddmm(col_factor, row_factor, layout_t, "sampled_addmm", col_owner, row_owner)
                return values_t.index_select(0, back).to(out_dtype)
            # At most SDDMM_CALL_MAX_TOKENS tokens per batched call: the reorder buffers stay
            # bounded (tokens x features each) however long the batch is.
            n_calls = max(1, -(-tokens // SDDMM_CALL_MAX_TOKENS))
            out = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "CSR support is in beta"
                for c in range(n_calls):
                    start, stop = tokens * c // n_calls, tokens * (c + 1) // n_calls
                    n_blocks = max(1, round((stop - start) / SDDMM_TOKEN_BLOCK))
                    owners = (row_owner, col_owner) if n_calls == 1 else (None, None)
                    part = _sampled_addmm_token_blocks(row_factor[start:stop], col_factor[start:stop], layout,
                                                       n_blocks, *owners)
                    out = part if out is None else out.add_(part)
            return out.to(out_dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "CSR support is in beta": said once per process, not useful here
            pattern = torch.sparse_csr_tensor(
                layout.crow, layout.col, row_factor.new_zeros(layout.numel), size=layout.weight_shape,
                check_invariants=False,  # the layout is built from validated, sorted, unique indices
            )
        # Both operands token-contiguous: each sampled entry is one contiguous dot product.
        # The transposes go into reused per-thread buffers (no fresh allocation per layer),
        # a block of tokens at a time when SDDMM_TOKEN_CHUNK is set (see there).
        blocked = SDDMM_TOKEN_CHUNK and TRANSPOSE_SCRATCH and on_cpu  # measured on CPU only
        n_chunks = max(1, round(tokens / SDDMM_TOKEN_CHUNK)) if blocked else 1
        result = pattern
        for c in range(n_chunks):
            start, stop = tokens * c // n_chunks, tokens * (c + 1) // n_chunks
            rf, cf = (row_factor, col_factor) if n_chunks == 1 else (row_factor[start:stop], col_factor[start:stop])
            if TRANSPOSE_SCRATCH and not differentiable:
                mat1 = _transposed_into_scratch(rf, "row")
                mat2 = _transposed_into_scratch(cf, "col").t()
            else:
                mat1 = rf.t().contiguous()
                mat2 = cf.t().contiguous().t()
            result = torch.sparse.sampled_addmm(result, mat1, mat2, beta=1.0 if c else 0.0)
        return result.values().to(out_dtype)
    if backend != "gather":
        raise ValueError(f"unknown SDDMM backend {backend!r}")
    # Gather with an fp32 accumulator, chunked so memory stays bounded.
    acc_dtype = torch.float32 if row_factor.dtype in (torch.float16, torch.bfloat16) else row_factor.dtype
    out = torch.empty(layout.numel, dtype=acc_dtype, device=row_factor.device)
    chunk = max(1, GATHER_CHUNK_ELEMENTS // max(tokens, 1))
    for start in range(0, layout.numel, chunk):
        r = layout.rows[start:start + chunk]
        c = layout.col[start:start + chunk]
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


# How a kernel gets W + S (section 2 of DESIGN.md); all give bit-identical results:
#   "clone"    a fresh copy of W plus the values (one allocation and O(numel) copy per call);
#   "scratch"  the same into a reused per-thread buffer of W's shape (no allocation, still O(numel));
#   "inplace"  add the values into W itself, run the matmul, put the k original entries back
#              (O(k); the originals are copied back, so W is restored bit for bit);
#   "auto"     inplace at a low density, scratch above it.
# Building W + S alone, 1 thread, CPU time (bench/bench_weight_modes.py, results/weight_modes.json),
# at 0.1 / 1 / 3 / 10 % density: 384x384 inplace 31 / 44 / 68 / 123 us, scratch 55 / 59 / 62 / 78 us;
# 1536x384 inplace 38 / 88 / 205 / 410 us, scratch 112 / 140 / 184 / 248 us. Crossover near 2-3 %.
WEIGHT_MODES = ("auto", "inplace", "scratch", "clone")
# "auto" takes "inplace" at or below this fraction of indexed entries, "scratch" above it.
INPLACE_MAX_DENSITY = 0.02
_INPLACE_LOCK = threading.RLock()
_SCRATCH = threading.local()


def _scratch_buffer(weight: torch.Tensor) -> torch.Tensor:
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    key = (tuple(weight.shape), weight.dtype, weight.device)
    buf = bufs.get(key)
    if buf is None:
        buf = bufs[key] = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    return buf


def resolve_weight_mode(mode: str, weight: torch.Tensor, num_entries: int) -> str:
    """The concrete way to build W + S for one call (see ``WEIGHT_MODES``)."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"unknown weight mode {mode!r}; choose one of {', '.join(WEIGHT_MODES)}")
    if torch.is_grad_enabled() or type(weight.data) is not torch.Tensor or not weight.is_contiguous():
        # Grad mode inside a kernel means a double backward records the matmul and keeps its
        # weight operand: it must be a private copy. Tensor subclasses (DTensor shards) and
        # odd strides also take the plain path.
        return "clone"
    if num_entries == weight.numel():
        return "clone"  # a full index: touching every entry anyway
    if mode == "auto":
        return "inplace" if num_entries <= INPLACE_MAX_DENSITY * weight.numel() else "scratch"
    return mode


def with_effective_weight(weight: torch.Tensor, values: torch.Tensor, layout: IndexLayout, mode: str,
                          fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(W + S)``; ``fn`` must not keep a reference to its argument (it may be W itself
    or a shared scratch buffer) and must return a fresh tensor."""
    if values.numel() == 0:
        return fn(weight.detach())
    mode = resolve_weight_mode(mode, weight, values.numel())
    vals = values.detach().to(weight.dtype)
    if mode == "clone":
        return fn(effective_weight(weight, layout.indices, values))
    if mode == "scratch":
        buf = _scratch_buffer(weight)
        buf.copy_(weight.detach())
        buf.view(-1).index_add_(0, layout.indices, vals)
        return fn(buf)
    # inplace: ``.data`` so that the temporary change neither bumps W's version counter nor
    # is seen by autograd; W is frozen and this function never lets autograd save it.
    w = weight.data
    flat = w.view(-1)
    with _INPLACE_LOCK:
        original = flat.index_select(0, layout.indices)
        flat.index_add_(0, layout.indices, vals)
        try:
            return fn(w)
        finally:
            flat.index_copy_(0, layout.flat_long, original)


def _forward_kernel(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    if transposed:
        # Same kernel as transformers' Conv1D (addmm), so zero values give bit-identical outputs.
        x2 = _as_2d(x)
        out = torch.addmm(bias, x2, w) if bias is not None else x2.matmul(w)
        return out.view(*x.shape[:-1], w.shape[-1])
    return F.linear(x, w, bias)


def _grad_input_kernel(grad_out: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:
    return grad_out.matmul(w.t()) if transposed else grad_out.matmul(w)


class SparseDeltaFunction(torch.autograd.Function):
    """y = x @ (W + S)^T + b for Linear, y = x @ (W + S) + b for Conv1D."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, layout, transposed, backend, grad_observer, weight_mode="auto"):
        out = with_effective_weight(weight, values, layout, weight_mode, lambda w: _forward_kernel(x, w, bias, transposed))
        ctx.save_for_backward(x, weight, values, indices)
        ctx.layout = layout
        ctx.weight_mode = weight_mode
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
        # One 2-D (contiguous) copy of the output gradient serves both matmuls below: a
        # non-contiguous one (e.g. from the attention heads' permute) would otherwise be copied twice.
        g2 = _as_2d(grad_out)
        if needs_x:
            # Recomputing W + S costs O(k) (or one copy): cheaper than keeping a dense copy alive.
            grad_x = with_effective_weight(weight, values, ctx.layout, ctx.weight_mode,
                                           lambda w: _grad_input_kernel(g2, w, ctx.transposed))
            grad_x = grad_x.view(*x.shape[:-1], grad_x.shape[-1])
        x2 = _as_2d(x)
        # Weight rows are outputs for Linear (W: out x in) and inputs for Conv1D (W: in x out).
        row_factor, col_factor = (x2, g2) if ctx.transposed else (g2, x2)
        # Only scoring steps ask for the dense gradient of the frozen weight; it then also
        # gives the values' gradient (a gather) instead of a separate SDDMM.
        dense = row_factor.t().matmul(col_factor) if ctx.grad_observer is not None else None
        if needs_values:
            if dense is not None:
                grad_values = dense.reshape(-1).index_select(0, indices).to(values.dtype)
            else:
                owners = (x, None) if ctx.transposed else (None, x)
                grad_values = sddmm(row_factor, col_factor, ctx.layout, ctx.backend, *owners).to(values.dtype)
        if needs_bias and ctx.has_bias:
            grad_bias = g2.sum(0)
        if dense is not None:
            ctx.grad_observer(dense)  # after the gather: an observer may reuse the buffer in place
        return grad_x, None, grad_bias, grad_values, None, None, None, None, None, None


# -- the same computation as torch custom ops, for torch.compile ---------------------------
# Dynamo cannot trace through SparseDeltaFunction's non-tensor arguments (the layout object,
# the observer callable) and would break the graph at every layer. Under torch.compile the
# layer calls these ops instead: opaque to the compiler, with the same kernels as above and
# their backward registered, so the compiled graph holds one node per sparse layer each way.
# (Scoring steps, which set a grad observer, keep the autograd.Function and graph-break.)
_OP_NS = "sparseft"


def _layout_from(indices, crow, col, rows, flat_long, weight_shape) -> IndexLayout:
    return IndexLayout(indices, weight_shape, parts=(crow, col, rows, flat_long))


@torch.library.custom_op(f"{_OP_NS}::delta_linear", mutates_args=())
def _delta_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor,
                     indices: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, rows: torch.Tensor,
                     flat_long: torch.Tensor, transposed: bool, weight_mode: str, backend: str) -> torch.Tensor:
    # ``backend`` is the SDDMM backend of the backward. W is changed and restored bit for bit inside ("inplace" mode): nothing mutated on exit.
    layout = _layout_from(indices, crow, col, rows, flat_long, weight.shape)
    return with_effective_weight(weight, values, layout, weight_mode, lambda w: _forward_kernel(x, w, bias, transposed))


@_delta_linear_op.register_fake
def _(x, weight, bias, values, indices, crow, col, rows, flat_long, transposed, weight_mode, backend):
    out_features = weight.shape[1] if transposed else weight.shape[0]
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op(f"{_OP_NS}::delta_grad_input", mutates_args=())
def _delta_grad_input_op(grad_out: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                         crow: torch.Tensor, col: torch.Tensor, rows: torch.Tensor, flat_long: torch.Tensor,
                         transposed: bool, weight_mode: str) -> torch.Tensor:
    layout = _layout_from(indices, crow, col, rows, flat_long, weight.shape)
    return with_effective_weight(weight, values, layout, weight_mode,
                                 lambda w: _grad_input_kernel(grad_out, w, transposed))


@_delta_grad_input_op.register_fake
def _(grad_out, weight, values, indices, crow, col, rows, flat_long, transposed, weight_mode):
    in_features = weight.shape[0] if transposed else weight.shape[1]
    return grad_out.new_empty((*grad_out.shape[:-1], in_features))


@torch.library.custom_op(f"{_OP_NS}::sddmm", mutates_args=())
def _sddmm_op(row_factor: torch.Tensor, col_factor: torch.Tensor, indices: torch.Tensor, crow: torch.Tensor,
              col: torch.Tensor, rows: torch.Tensor, flat_long: torch.Tensor, weight_rows: int, weight_cols: int,
              backend: str) -> torch.Tensor:
    layout = _layout_from(indices, crow, col, rows, flat_long, (weight_rows, weight_cols))
    return sddmm(row_factor, col_factor, layout, backend)


@_sddmm_op.register_fake
def _(row_factor, col_factor, indices, crow, col, rows, flat_long, weight_rows, weight_cols, backend):
    return row_factor.new_empty((indices.shape[0],))


def _delta_linear_setup(ctx, inputs, output):
    x, weight, bias, values, indices, crow, col, rows, flat_long, transposed, weight_mode, backend = inputs
    ctx.save_for_backward(x, weight, values, indices, crow, col, rows, flat_long)
    ctx.transposed = transposed
    ctx.weight_mode = weight_mode
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _delta_linear_backward(ctx, grad_out):
    x, weight, values, indices, crow, col, rows, flat_long = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x = grad_bias = grad_values = None
    g2 = _as_2d(grad_out)  # one copy for both matmuls (see SparseDeltaFunction.backward)
    if needs[0]:
        grad_x = _delta_grad_input_op(g2, weight, values, indices, crow, col, rows, flat_long,
                                      ctx.transposed, ctx.weight_mode)
        grad_x = grad_x.view(*x.shape[:-1], grad_x.shape[-1])
    x2 = _as_2d(x)
    row_factor, col_factor = (x2, g2) if ctx.transposed else (g2, x2)
    if needs[3]:
        grad_values = _sddmm_op(row_factor, col_factor, indices, crow, col, rows, flat_long,
                                weight.shape[0], weight.shape[1], ctx.backend).to(values.dtype)
    if needs[2] and ctx.has_bias:
        grad_bias = g2.sum(0)
    return grad_x, None, grad_bias, grad_values, None, None, None, None, None, None, None, None


_delta_linear_op.register_autograd(_delta_linear_backward, setup_context=_delta_linear_setup)


def sparse_delta_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor,
                        layout: IndexLayout, transposed: bool, backend: str = "auto", weight_mode: str = "auto",
                        grad_observer: Callable[[torch.Tensor], None] | None = None,
                        use_op: bool | None = None) -> torch.Tensor:
    """y = x @ (W + S)^T + b (Linear) or x @ (W + S) + b (Conv1D) with the sparse-delta backward.

    ``use_op`` picks the custom-op path (default: only while torch.compile traces); the
    autograd.Function path is taken otherwise and whenever a grad observer is set.
    """
    if use_op is None:
        use_op = torch.compiler.is_compiling()
    if use_op and grad_observer is None:
        return _delta_linear_op(x, weight, bias, values, layout.indices, *layout.parts, transposed, weight_mode, backend)
    return SparseDeltaFunction.apply(x, weight, bias, values, layout.indices, layout, transposed, backend,
                                     grad_observer, weight_mode)


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
        # Built now, not on first use: a compiled forward then only reads it.
        self._layout = IndexLayout(self.indices, self.weight.shape)

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
            self._layout = IndexLayout(self.indices, self.weight.shape)
        return self._layout

    def _apply(self, fn, recurse=True):  # keep the cached layout on the module's device
        self._layout = None
        out = super()._apply(fn, recurse)
        self._layout = IndexLayout(self.indices, self.weight.shape)
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
