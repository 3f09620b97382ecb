"""Training-time policies. A method chooses index sets; the core does the surgery.

Each method implements ``init(model, calibration_data)`` (the first index sets),
``on_step_begin(step, model)`` (before the step's backward passes) and
``on_step(step, model, optimizer, batch)`` (after every optimizer step; may change index
sets through ``SparseModel.set_index_sets``). No method owns a loop.
"""
from __future__ import annotations

from ..config import SparseConfig
from .base import Method
from .dynamic import DynamicMask
from .static import StaticMask


def get_method(config: SparseConfig) -> Method:
    from .dst import DST
    from .grow_drop import GrowDrop
    from .id3 import ID3

    training_time = {"id3": ID3, "dst": DST, "grow-drop": GrowDrop}
    if config.method in training_time:
        return training_time[config.method](config)
    if config.schedule == "dynamic":
        return DynamicMask(config)
    return StaticMask(config)


__all__ = ["DynamicMask", "Method", "StaticMask", "get_method"]
