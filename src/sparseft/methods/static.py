"""Static masks: score once before training, keep the top-k, then train."""
from __future__ import annotations

from typing import Any

from .. import registry
from ..scoring import compute_scores
from ..select import resolve_budget, select_topk
from .base import Method


def score_and_select(model: Any, data: Any = None, seed: int | None = None) -> dict:
    """Scores of the configured method over the targeted layers, then the top-k index sets."""
    cfg = model.sparse_config
    layers = model.sparse_layers()
    budget = resolve_budget(cfg, model.target_shapes())
    selector = registry.get(cfg.method).load_selector()
    if selector is not None:  # e.g. grasp: scored group by group into a streaming top-k (less memory)
        return selector(layers, budget, cfg.selection, model=model, data=data, micro_batch=cfg.calibration.micro_batch,
                        loss_fn=cfg.calibration.loss_fn)
    scores = compute_scores(
        cfg.method, layers, model=model, data=data, seed=cfg.seed if seed is None else seed,
        order=cfg.magnitude_order, d3_epsilon=cfg.id3.d3_epsilon, d3_exponent=cfg.id3.d3_exponent,
        micro_batch=cfg.calibration.micro_batch, loss_fn=cfg.calibration.loss_fn,
    )
    return select_topk(scores, budget, cfg.selection, consume=True)


class StaticMask(Method):
    name = "static"

    def init(self, model: Any, calibration_data: Any = None) -> None:
        model.set_index_sets(score_and_select(model, calibration_data))
