"""Dynamic masks (SPEFT dynamic): rescore every ``dynamic.update_every`` steps and move the index sets.

Gradient-based scorers read the dense weight gradients of the last ``dynamic.score_window``
ordinary training steps before each update: ``on_step_begin`` arms the layers'
``grad_observer`` for those steps, so the training backward pass itself yields them (no
extra passes, and it works under ``transformers.Trainer``, which hands callbacks no
batch). Data-free scorers (random, magnitude, synflow) are simply recomputed.

At an update, entries that stay keep their values and optimizer state; new entries start
at zero with fresh per-entry optimizer state (step 0); dropped entries are folded into the
base weight (``dynamic.drop_policy="merge"``, recorded and saved with the adapter) or discarded
(``"zero"``). The budget is the same after every update.
"""
from __future__ import annotations

from typing import Any

from .. import registry
from ..scoring import GradientSum, compute_scores, scores_from_gradient
from ..select import resolve_budget
from ..tiles import select_entries
from .base import Method
from .static import score_and_select, weight_shapes


# Scorers that read loss gradients from calibration batches rescore from the dense
# gradients of ordinary training steps instead; the others are simply recomputed.
FROM_TRAINING_GRADIENTS = registry.names(registry.SCORER, needs_calibration=True, can_run_dynamic=True)


class DynamicMask(Method):
    name = "dynamic"

    def __init__(self, config):
        super().__init__(config)
        self.updates = 0
        self.history: list[dict[str, int]] = []
        self._grads: GradientSum | None = None

    def init(self, model: Any, calibration_data: Any = None) -> None:
        model.set_index_sets(score_and_select(model, calibration_data))

    def in_window(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) feeds the next rescoring."""
        u, w = self.config.dynamic.update_every, self.config.dynamic.score_window
        return (step - 1) % u >= u - w

    def on_step_begin(self, step: int, model: Any) -> None:
        if self.config.method not in FROM_TRAINING_GRADIENTS or not self.in_window(step):
            return
        if self._grads is None:
            self._grads = GradientSum()
        self._grads.arm(model.sparse_layers())  # idempotent: also re-arms after a resume

    def _disarm(self, model: Any) -> None:
        GradientSum.disarm(model.sparse_layers())

    def on_step(self, step: int, model: Any, optimizer: Any = None, batch: Any = None) -> None:
        if step % self.config.dynamic.update_every:
            return
        cfg = self.config
        self._disarm(model)
        layers = model.sparse_layers()
        if cfg.method in FROM_TRAINING_GRADIENTS:
            grads, self._grads = self._grads, None
            if grads is None or not grads.buffers:
                return  # no window seen since the last update (e.g. training resumed here)
            grads.buffers = grads.pop()  # averaged over ranks: every rank makes the same choice
            scores = scores_from_gradient(cfg.method, layers, grads, cfg.id3.d3_epsilon, cfg.id3.d3_exponent)
        else:
            scores = compute_scores(cfg.method, layers, model=model, seed=cfg.seed + self.updates + 1,
                                    order=cfg.magnitude_order)
        index_sets = select_entries(scores, weight_shapes(layers), resolve_budget(cfg, model.target_shapes()),
                                    cfg.selection, cfg.granularity, consume=True)
        del scores
        dropped = model.set_index_sets(index_sets, optimizer, drop_policy=cfg.dynamic.drop_policy)
        self.updates += 1
        self.history.append({"step": step, "moved": sum(dropped.values())})

    def state_dict(self) -> dict:
        state = {"updates": self.updates, "history": list(self.history)}
        if self._grads is not None:  # a checkpoint inside a scoring window keeps the partial sums
            state["window_grads"] = dict(self._grads.buffers)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state.get("updates", 0))
        self.history = list(state.get("history", []))
        self._grads = None
        if "window_grads" in state:
            self._grads = GradientSum()
            self._grads.buffers = dict(state["window_grads"])
