"""Static masks: score once before training, keep the top-k, then train."""
from __future__ import annotations

from typing import Any, Iterator

from .. import registry
from ..scoring import compute_scores
from ..select import resolve_budget
from ..tiles import select_entries, select_streamed, tile_side
from .base import Method


def score_and_select(model: Any, data: Any = None, seed: int | None = None) -> dict:
    """Scores of the configured method over the targeted layers, then the top-k index sets."""
    cfg = model.sparse_config
    layers = model.sparse_layers()
    budget = resolve_budget(cfg, model.target_shapes())
    shapes = weight_shapes(layers)
    t = tile_side(cfg.granularity)
    spec = registry.get(cfg.method)
    if spec.layerwise:
        per_layer = scores_by_layer(cfg.method, layers, seed=cfg.seed if seed is None else seed,
                                    order=cfg.magnitude_order)
        return select_streamed(per_layer, shapes, budget, cfg.selection, cfg.granularity)
    if cfg.method == "grasp" and t > 1:  # tiles: each layer's scores pooled as they arrive
        from ..scoring.grasp import GROUP_FRACTION, GROUP_MIN_BYTES, grasp_groups, grasp_stream

        groups = grasp_groups(layers, GROUP_FRACTION, GROUP_MIN_BYTES)
        stream = grasp_stream(layers, model, data, cfg.calibration.micro_batch, groups,
                              loss_fn=cfg.calibration.loss_fn, memory_mb=cfg.calibration.memory_mb)
        return select_streamed(stream, shapes, budget, cfg.selection, cfg.granularity)
    selector = spec.load_selector()
    if selector is not None:  # e.g. grasp: scored group by group into a streaming top-k (less memory)
        return selector(layers, budget, cfg.selection, model=model, data=data, micro_batch=cfg.calibration.micro_batch,
                        loss_fn=cfg.calibration.loss_fn, memory_mb=cfg.calibration.memory_mb)
    scores = compute_scores(
        cfg.method, layers, model=model, data=data, seed=cfg.seed if seed is None else seed,
        order=cfg.magnitude_order, d3_epsilon=cfg.id3.d3_epsilon, d3_exponent=cfg.id3.d3_exponent,
        micro_batch=cfg.calibration.micro_batch, loss_fn=cfg.calibration.loss_fn, memory_mb=cfg.calibration.memory_mb,
    )
    return select_entries(scores, shapes, budget, cfg.selection, cfg.granularity, consume=True)


def scores_by_layer(method: str, layers: Any, **kwargs: Any) -> Iterator[tuple[str, Any]]:
    """(name, scores) of a layerwise scorer (registry: ``layerwise``), one layer at a time:
    each layer scored alone gets the scores it gets among all of them."""
    for name, layer in layers.items():
        yield name, compute_scores(method, {name: layer}, **kwargs)[name]


def weight_shapes(layers: Any) -> dict[str, tuple[int, int]]:
    """The stored weight's shape per layer (what flat indices and tiles refer to)."""
    return {n: tuple(layer.weight.shape) for n, layer in layers.items()}


class StaticMask(Method):
    name = "static"

    def init(self, model: Any, calibration_data: Any = None) -> None:
        model.set_index_sets(score_and_select(model, calibration_data))
