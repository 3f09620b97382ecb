"""Static masks: score once before training, keep the top-k, then train."""
from __future__ import annotations

from typing import Any

from .. import registry
from ..scoring import compute_scores
from ..select import resolve_budget
from ..tiles import pool_scores, select_entries, select_tiles, tile_side
from .base import Method


def score_and_select(model: Any, data: Any = None, seed: int | None = None) -> dict:
    """Scores of the configured method over the targeted layers, then the top-k index sets."""
    cfg = model.sparse_config
    layers = model.sparse_layers()
    budget = resolve_budget(cfg, model.target_shapes())
    shapes = weight_shapes(layers)
    t = tile_side(cfg.granularity)
    if cfg.method == "grasp" and t > 1:  # tiles: each layer's scores pooled as they arrive
        from ..scoring.grasp import GROUP_FRACTION, GROUP_MIN_BYTES, grasp_groups, grasp_stream

        groups = grasp_groups(layers, GROUP_FRACTION, GROUP_MIN_BYTES)
        stream = grasp_stream(layers, model, data, cfg.calibration.micro_batch, groups,
                              loss_fn=cfg.calibration.loss_fn, memory_mb=cfg.calibration.memory_mb)
        return select_tiles({n: pool_scores(s, shapes[n], t) for n, s in stream}, shapes, t, budget, cfg.selection)
    selector = registry.get(cfg.method).load_selector()
    if selector is not None:  # e.g. grasp: scored group by group into a streaming top-k (less memory)
        return selector(layers, budget, cfg.selection, model=model, data=data, micro_batch=cfg.calibration.micro_batch,
                        loss_fn=cfg.calibration.loss_fn, memory_mb=cfg.calibration.memory_mb)
    scores = compute_scores(
        cfg.method, layers, model=model, data=data, seed=cfg.seed if seed is None else seed,
        order=cfg.magnitude_order, d3_epsilon=cfg.id3.d3_epsilon, d3_exponent=cfg.id3.d3_exponent,
        micro_batch=cfg.calibration.micro_batch, loss_fn=cfg.calibration.loss_fn, memory_mb=cfg.calibration.memory_mb,
    )
    return select_entries(scores, shapes, budget, cfg.selection, cfg.granularity, consume=True)


def weight_shapes(layers: Any) -> dict[str, tuple[int, int]]:
    """The stored weight's shape per layer (what flat indices and tiles refer to)."""
    return {n: tuple(layer.weight.shape) for n, layer in layers.items()}


class StaticMask(Method):
    name = "static"

    def init(self, model: Any, calibration_data: Any = None) -> None:
        model.set_index_sets(score_and_select(model, calibration_data))
