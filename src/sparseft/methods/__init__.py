"""Training-time policies. A method chooses index sets; the core does the surgery.

Each method implements ``init(model, calibration_data)`` (the first index sets),
``on_step_begin(step, model)`` (before the step's backward passes) and
``on_step(step, model, optimizer, batch)`` (after every optimizer step; may change index
sets through ``SparseModel.set_index_sets``). No method owns a loop.
"""
from __future__ import annotations

from .. import registry
from ..config import SparseConfig
from .base import Method
from .dynamic import DynamicMask
from .static import StaticMask


def get_method(config: SparseConfig) -> Method:
    spec = registry.get(config.method)
    if spec.kind == registry.TRAINING_TIME:
        return spec.load()(config)
    if config.schedule == "dynamic":
        return DynamicMask(config)
    return StaticMask(config)


__all__ = ["DynamicMask", "Method", "StaticMask", "get_method"]
