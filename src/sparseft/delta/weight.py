"""How a kernel gets the effective weight W + S without keeping a dense copy of it."""
from __future__ import annotations

import threading
from typing import Callable

import torch

from .layout import IndexLayout
from .scratch import _scratch_buffer


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


# How a kernel gets W + S (docs/architecture.md); all give bit-identical results:
#   "clone"    a fresh copy of W plus the values (one allocation and O(numel) copy per call);
#   "scratch"  the same into a reused per-thread buffer of W's shape (no allocation, still O(numel));
#   "inplace"  add the values into W itself, run the matmul, put the k original entries back
#              (O(k); the originals are copied back, so W is restored bit for bit);
#   "auto"     inplace at a low density, scratch above it.
# Building W + S alone, 1 thread, CPU time (bench/bench_weight_modes.py). An earlier run
# (results/weight_modes.json), at 0.1 / 1 / 3 / 10 % density: 384x384 inplace 31 / 44 / 68 / 123 us,
# scratch 55 / 59 / 62 / 78 us; 1536x384 inplace 38 / 88 / 205 / 410 us, scratch 112 / 140 / 184 / 248 us.
# On 2026-11-29 (a loaded 2-vCPU VM), 1536x384 at 1 / 2 / 3 / 5 %: inplace 105 / 170 / 275 / 418 us,
# scratch 295 / 336 / 375 / 413 us; the crossover moved to ~5 %. A tile mask's entries come in runs
# of t consecutive positions, which the index ops walk far faster: 1536x384 tile16 at 3 / 10 / 25 %,
# inplace 70 / 251 / 598 us, scratch 278 / 347 / 445 us (crossover ~15 %).
WEIGHT_MODES = ("auto", "inplace", "scratch", "clone")
# "auto" takes "inplace" at or below this fraction of indexed entries, "scratch" above it.
INPLACE_MAX_DENSITY = 0.04
# The same for an index made of whole tiles (IndexLayout.tiles).
INPLACE_MAX_DENSITY_TILES = 0.12
_INPLACE_LOCK = threading.RLock()


def resolve_weight_mode(mode: str, weight: torch.Tensor, num_entries: int, tiled: bool = False) -> str:
    """The concrete way to build W + S for one call (see ``WEIGHT_MODES``); ``tiled``: the
    index is whole tiles."""
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
        limit = INPLACE_MAX_DENSITY_TILES if tiled else INPLACE_MAX_DENSITY
        return "inplace" if num_entries <= limit * weight.numel() else "scratch"
    return mode


def with_effective_weight(weight: torch.Tensor, values: torch.Tensor, layout: IndexLayout, mode: str,
                          fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(W + S)``; ``fn`` must not keep a reference to its argument (it may be W itself
    or a shared scratch buffer) and must return a fresh tensor."""
    if values.numel() == 0:
        return fn(weight.detach())
    mode = resolve_weight_mode(mode, weight, values.numel(), layout.tiles is not None)
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
