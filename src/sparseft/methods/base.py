"""The interface every method implements."""
from __future__ import annotations

from typing import Any

from ..config import SparseConfig


class Method:
    """A policy over index sets. Static methods only implement ``init``."""

    name = "base"

    def __init__(self, config: SparseConfig):
        self.config = config

    def init(self, model: Any, calibration_data: Any = None) -> None:
        raise NotImplementedError

    def on_step_begin(self, step: int, model: Any) -> None:
        """Called before the forward/backward passes of optimizer step ``step`` (1-based).

        A method that scores from gradients arms the layers' ``grad_observer`` here, so
        the ordinary backward pass of this step also yields the dense weight gradient.
        """

    def on_step(self, step: int, model: Any, optimizer: Any = None, batch: Any = None) -> None:
        """Called after optimizer step ``step`` (1-based); may change index sets."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
