"""Reused per-thread buffers: the SDDMM's reordered operands and the W + S scratch weight."""
from __future__ import annotations

import threading

import torch

_TRANSPOSE_SCRATCH = threading.local()


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
_SCRATCH = threading.local()


def _scratch_buffer(weight: torch.Tensor) -> torch.Tensor:
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    key = (tuple(weight.shape), weight.dtype, weight.device)
    buf = bufs.get(key)
    if buf is None:
        buf = bufs[key] = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    return buf



def release_scratch() -> None:
    """Free this thread's reused buffers (W + S scratch and SDDMM transposes)."""
    _TRANSPOSE_SCRATCH.__dict__.pop("bufs", None)
    _REORDERED.__dict__.pop("last", None)
    _SCRATCH.__dict__.pop("bufs", None)

