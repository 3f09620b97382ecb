"""Salience scores: one flat float32 tensor per targeted weight, higher = keep.

Scorers (docs/methods.md; g is the mean gradient of the loss over the calibration
examples, w the frozen weight):

=========  ==========================================================================
random     U(0, 1), seeded per layer name
magnitude  |w| (or -|w|: smallest first, as PaFi)
gradient   |g|
snip       |w * g|
taylor     (w * g)^2
d3         |g| / (|w| + eps)^e  (ID3; e = 0 makes it |g|)
fisher     mean over examples of the per-example squared gradient (micro-batches of one)
grasp      w * (H g)  (Hessian-gradient product, forward-over-reverse; raw value, as SPEFT)
synflow    |w * dR/dw|, R = sum of the logits with every parameter made positive, on an
           all-ones ``inputs_embeds`` of one token (weights restored exactly afterwards)
=========  ==========================================================================

Memory: the gradient-based scorers never set ``W.grad``. Each targeted layer's dense
gradient is handed to a ``grad_observer`` during the ordinary backward pass (one
weight-sized temporary at a time) and summed into one float32 buffer per layer, which is
then turned into the score in place. Calibration batches run in micro-batches
(``micro_batch`` examples, weighted by their share of the batch's loss items), so only
one micro-batch's activations are alive at a time. grasp holds g and, per group of
layers, H g; the groups' scores go straight into a streaming top-k (``grasp_select``).

Modules: ``calibration`` (batches, micro-batches, the loss, the mean gradient),
``scorers`` (all but GraSP), ``grasp`` (GraSP and its grouped, streaming selection).
"""
from __future__ import annotations

from typing import Mapping

import torch

from .. import registry
from ..delta import SparseDeltaLayer
from .calibration import (Batch, GradientSum, batch_size, calibration_batches, loss_items, mean_gradient,
                          micro_batches, observing, scoring_mode, split_examples)
from .grasp import HG_METHODS, dense_weights, grasp_groups, grasp_scores, grasp_select, grasp_stream
from .scorers import (ScoreFn, d3_scores, fisher_scores, gradient_scores, magnitude_scores, random_scores,
                      scores_from_gradient, snip_scores, synflow_scores, taylor_scores)

# Every scorer the registry names, by name.
SCORERS: dict[str, ScoreFn] = {name: registry.get(name).load() for name in registry.names(registry.SCORER)}


def compute_scores(method: str, layers: Mapping[str, SparseDeltaLayer], **kwargs: object) -> dict[str, torch.Tensor]:
    try:
        scorer = SCORERS[method]
    except KeyError:
        raise ValueError(f"no scorer named {method!r}; known: {', '.join(sorted(SCORERS))}") from None
    return scorer(layers, **kwargs)
