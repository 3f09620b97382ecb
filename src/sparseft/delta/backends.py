"""The values' gradient as a sampled dense-dense matmul (SDDMM): its backends and how
``auto`` picks one (a cost model measured on CPU, the compiled kernel where built, the dense
matmul on CUDA)."""
from __future__ import annotations

import warnings
import weakref

import torch

from .. import native
from ..blocksparse import tile_sddmm
from .layout import IndexLayout
from .scratch import _REORDERED, _scratch_flat

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
_CPU_FP32 = torch.empty(0)  # what the compiled kernel's working buffers are (see _scratch_flat)


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
    if layout.tiles is not None and backend == "auto":
        # Whole aligned tiles: one small dense product per tile (blocksparse.py).
        return tile_sddmm(row_factor, col_factor, layout.tiles)
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
