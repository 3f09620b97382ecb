"""The interface every method implements."""
from __future__ import annotations

from typing import Any

from ..config import SparseConfig


class Method:
    """A policy over index sets. Static methods only implement ``init``."""

    name = "base"

    def __init__(self, config: SparseConfig):
        self.config = config
        self.total_steps: int | None = None

    def init(self, model: Any, calibration_data: Any = None) -> None:
        raise NotImplementedError

    def on_train_begin(self, total_steps: int | None, model: Any) -> None:
        """Called once before training with the planned number of optimizer steps."""
        self.total_steps = total_steps

    def on_step_begin(self, step: int, model: Any) -> None:
        """Called before the forward/backward passes of optimizer step ``step`` (1-based).

        A method that scores from gradients arms the layers' ``grad_observer`` here, so
        the ordinary backward pass of this step also yields the dense weight gradient.
        """

    def on_before_update(self, step: int, model: Any, optimizer: Any = None) -> None:
        """Called once the gradients of step ``step`` are in, before clipping and the
        optimizer step. A method may grow index sets here and hand the new entries their
        gradient, so they are trained from this very step (ID3)."""

    def on_step(self, step: int, model: Any, optimizer: Any = None, batch: Any = None) -> None:
        """Called after optimizer step ``step`` (1-based); may change index sets."""

    def on_train_end(self, model: Any, optimizer: Any = None) -> None:
        """Called once after the last step (e.g. to turn a dense working form into the
        sparse index/values form that is saved)."""

    def active_entries(self, model: Any) -> int:
        """Entries that receive an optimizer update at the current step."""
        return model.num_sparse_params()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
