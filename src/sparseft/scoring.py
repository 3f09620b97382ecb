"""Salience scores: one flat float32 tensor per targeted weight, higher = keep.

The scorers here need no data. Gradient-based scorers (gradient, snip, fisher, ...)
take calibration batches and plug into the same ``SCORERS`` registry.
"""
from __future__ import annotations

import zlib
from typing import Callable, Mapping

import torch

from .delta import SparseDeltaLayer

ScoreFn = Callable[..., dict[str, torch.Tensor]]


def _layer_generator(seed: int, name: str) -> torch.Generator:
    # A per-layer stream keyed by the module name: the same layer gets the same
    # scores whatever else is targeted, and on every process.
    gen = torch.Generator()
    gen.manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63))
    return gen


def random_scores(layers: Mapping[str, SparseDeltaLayer], seed: int = 0, **_: object) -> dict[str, torch.Tensor]:
    """U(0, 1) per entry, seeded: the top-k is a uniform random subset."""
    return {
        name: torch.rand(layer.weight.numel(), generator=_layer_generator(seed, name)).to(layer.weight.device)
        for name, layer in layers.items()
    }


def magnitude_scores(layers: Mapping[str, SparseDeltaLayer], order: str = "largest", **_: object) -> dict[str, torch.Tensor]:
    """|w|, or -|w| to prefer the smallest weights (PaFi)."""
    sign = 1.0 if order == "largest" else -1.0
    return {name: sign * layer.weight.detach().float().abs().reshape(-1) for name, layer in layers.items()}


SCORERS: dict[str, ScoreFn] = {
    "random": random_scores,
    "magnitude": magnitude_scores,
}


def compute_scores(method: str, layers: Mapping[str, SparseDeltaLayer], **kwargs: object) -> dict[str, torch.Tensor]:
    try:
        scorer = SCORERS[method]
    except KeyError:
        raise ValueError(f"no scorer named {method!r}; known: {', '.join(sorted(SCORERS))}") from None
    return scorer(layers, **kwargs)
