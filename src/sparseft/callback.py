"""``SparseCallback``: lets a ``transformers.Trainer`` drive a SparseModel's method (the
same per-step calls as ``sparseft.train``, through ``SparseController``)."""
from __future__ import annotations

from typing import Any

from .quant import quiet_bitsandbytes_import
from .train import SparseController

with quiet_bitsandbytes_import():  # transformers' trainer modules import peft, which imports bitsandbytes
    from transformers import TrainerCallback


class SparseCallback(TrainerCallback):
    """Lets a ``transformers.Trainer`` drive a SparseModel's method.

    Pass ``optimizers=(sparseft.create_optimizer(model, lr), None)`` to the Trainer so
    methods that move entries get per-entry optimizer state; static methods also work
    with the Trainer's own AdamW.

    Multi-process (``accelerate launch`` / ``torchrun``): create the callback before the
    Trainer starts training (it marks the sparse values as DDP-ignored before the Trainer
    wraps the model, then averages their gradients itself; see docs/distributed.md).
    """

    def __init__(self, model: Any):
        self.controller = SparseController(model)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.controller.train_begin(state.max_steps, optimizer)
        return control

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # The Trainer clips gradients before this event: gradients that a method adds here
        # (ID3's newly unmasked entries) are not clipped on that step.
        self.controller.before_update(state.global_step + 1, optimizer)
        return control

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self.controller.train_end(optimizer)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self.controller.before_optimizer_step(state.global_step + 1)
        return control

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.controller.after_optimizer_step(state.global_step, optimizer=optimizer)
        return control
