"""Static masks: score once before training, keep the top-k, then train."""
from __future__ import annotations

from typing import Any

from ..scoring import compute_scores
from ..select import resolve_budget, select_topk
from .base import Method


class StaticMask(Method):
    name = "static"

    def init(self, model: Any, calibration_data: Any = None) -> None:
        cfg = self.config
        layers = model.sparse_layers()
        scores = compute_scores(cfg.method, layers, seed=cfg.seed, order=cfg.magnitude_order, data=calibration_data)
        budget = resolve_budget(cfg, model.target_shapes())
        model.set_index_sets(select_topk(scores, budget, cfg.selection))
