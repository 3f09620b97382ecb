"""The scorers other than GraSP (``grasp.py``): random, magnitude, the gradient scores
(gradient, snip, taylor, d3), fisher and synflow."""
from __future__ import annotations

import zlib
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from ..delta import SparseDeltaLayer
from ..distributed import all_reduce_mean_
from .calibration import (GradientSum, LossFn, _backward_to_values, _loss, _model_device, _to_device, _weight, batch_size,
                          calibration_batches, mean_gradient, observing, scoring_mode, split_examples)

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
        name: torch.rand(layer.weight_numel, generator=_layer_generator(seed, name)).to(layer.weight_device)
        for name, layer in layers.items()
    }


def magnitude_scores(layers: Mapping[str, SparseDeltaLayer], order: str = "largest", **_: object) -> dict[str, torch.Tensor]:
    """|w|, or -|w| to prefer the smallest weights (PaFi)."""
    scores = {}
    for name, layer in layers.items():
        s = _weight(layer).float().abs().reshape(-1)  # one fresh buffer per layer
        scores[name] = s if order == "largest" else s.neg_()
    return scores


def scores_from_gradient(method: str, layers: Mapping[str, SparseDeltaLayer], grads: GradientSum,
                         d3_epsilon: float = 1e-3, d3_exponent: float = 0.0) -> dict[str, torch.Tensor]:
    """Turn summed gradients into gradient/snip/taylor/d3 scores, in place, layer by layer."""
    scores = {}
    for name, layer in layers.items():
        g = grads.get(name, layer)
        if method == "gradient":
            g.abs_()
        elif method == "snip":
            g.mul_(_weight(layer)).abs_()
        elif method == "taylor":
            g.mul_(_weight(layer)).square_()
        elif method == "d3":
            g.abs_()
            if d3_exponent != 0.0:
                g.div_(_weight(layer).float().abs().add_(d3_epsilon).pow_(d3_exponent))
        else:
            raise ValueError(f"{method!r} is not a plain gradient scorer")
        scores[name] = g.reshape(-1)
    return scores


def _gradient_scorer(method: str) -> ScoreFn:
    def scorer(layers: Mapping[str, SparseDeltaLayer], model: nn.Module | None = None, data: Any = None,
               d3_epsilon: float = 1e-3, d3_exponent: float = 0.0, micro_batch: int | str | None = None,
               loss_fn: LossFn | str | None = None, memory_mb: float = 256.0, **_: object) -> dict[str, torch.Tensor]:
        grads = mean_gradient(model, layers, calibration_batches(data, method), micro_batch, loss_fn, memory_mb)
        return scores_from_gradient(method, layers, grads, d3_epsilon, d3_exponent)

    scorer.__name__ = f"{method}_scores"
    scorer.__doc__ = f"The {method} score from the mean gradient over the calibration batches."
    return scorer


gradient_scores = _gradient_scorer("gradient")
snip_scores = _gradient_scorer("snip")
taylor_scores = _gradient_scorer("taylor")
d3_scores = _gradient_scorer("d3")


def fisher_scores(layers: Mapping[str, SparseDeltaLayer], model: nn.Module | None = None, data: Any = None,
                  loss_fn: LossFn | str | None = None, **_: object) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal: mean over examples of (grad of that example's loss)^2.

    Examples run as micro-batches of one; each layer's per-example gradient is squared
    and added to its buffer as the backward pass reaches it.
    """
    batches = calibration_batches(data, "fisher")
    acc = GradientSum(square=True)
    total = sum(batch_size(b) for b in batches)
    acc.scale = 1.0 / total
    device = _model_device(model)
    with scoring_mode(model), observing(layers, acc.observer):
        for b in batches:
            for example in split_examples(b):
                _backward_to_values(_loss(model, _to_device(example, device), loss_fn), layers)
    all_reduce_mean_(acc.buffers)
    return {name: acc.get(name, layer).reshape(-1) for name, layer in layers.items()}


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    return logits


def _negate_where(p: torch.Tensor, mask: torch.Tensor, chunk: int = 1 << 20) -> None:
    """p[mask] = -p[mask], exactly and in place, in chunks (boolean indexing of a large
    parameter would build int64 index tensors twice its size)."""
    flat, m = p.view(-1), mask.view(-1)
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk]
        part.copy_(torch.where(m[start:start + chunk], part.neg(), part))


def synflow_scores(layers: Mapping[str, SparseDeltaLayer], model: nn.Module | None = None, **_: object) -> dict[str, torch.Tensor]:
    """SynFlow as in SPEFT: every parameter made positive, one forward pass on an all-ones
    ``inputs_embeds`` of a single token, R = sum of the logits, score |w * dR/dw|.

    Signs are kept as one bool per parameter entry and put back exactly (negation is exact).
    Nonlinearities are kept (SPEFT's patching of ``torch.nn.functional`` does not reach
    the activation modules transformers uses either).
    """
    if model is None:
        raise ValueError("synflow needs the model")
    emb = model.get_input_embeddings()
    hidden = emb.weight.shape[1]
    from ..delta.quantized import float_bases

    acc = GradientSum()
    # A quantized base runs on float copies here: every weight is made positive in place.
    with float_bases(layers.values()), scoring_mode(model):
        params = [p for p in model.parameters() if p.is_floating_point()]
        with torch.no_grad():
            signs = [torch.signbit(p) for p in params]
            for p in params:
                p.abs_()
        try:
            ones = torch.ones(1, 1, hidden, dtype=emb.weight.dtype, device=emb.weight.device)
            with observing(layers, acc.observer):
                r = _logits(model(inputs_embeds=ones)).float().sum()
                _backward_to_values(r, layers)
        finally:
            with torch.no_grad():
                for p, s in zip(params, signs):
                    _negate_where(p, s)
            del signs
    scores = {}
    for name, layer in layers.items():
        g = acc.get(name, layer)
        scores[name] = g.mul_(_weight(layer)).abs_().reshape(-1)
    return scores
