"""SparseConfig: what to fine-tune sparsely, with what budget and which method."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import registry


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


# Which methods exist and what each can do: registry.METHODS.
SCHEDULES = tuple(registry.SCHEDULES)
DROP_POLICIES = ("merge", "zero")
SELECTIONS = ("global", "per-layer")
MAGNITUDE_ORDERS = ("largest", "smallest")
BACKENDS = ("auto", "native", "sampled_addmm", "gather", "dense")


@dataclass
class SparseConfig:
    """Everything needed to rebuild a sparse fine-tune on top of a base model.

    Exactly one budget must be given: ``density`` (fraction of the targeted weights),
    ``num_params`` (absolute count) or ``match_lora_rank`` (as many entries as LoRA of
    that rank would train on the same targets).
    """

    method: str = "random"
    density: float | None = None
    num_params: int | None = None
    match_lora_rank: int | None = None
    target_modules: str | list[str] = "all-linear"
    exclude_modules: list[str] = field(default_factory=list)
    selection: str = "global"
    magnitude_order: str = "largest"
    seed: int = 0
    # Modules trained densely and saved with the adapter (task heads the checkpoint lacks).
    modules_to_save: list[str] = field(default_factory=list)
    train_bias: bool = False
    backend: str = "auto"
    # Scoring: calibration examples (capped by the training set) and the d3 (ID3) score
    # |g| / (|w| + d3_epsilon) ** d3_exponent.
    calib_examples: int = 1024
    # Examples per forward/backward pass while scoring: each calibration batch is split
    # into micro-batches of at most this many examples, weighted so that the gradient is
    # the batch's own (so selection memory does not grow with the calibration batch size).
    calib_micro_batch: int = 1
    d3_epsilon: float = 1e-3
    d3_exponent: float = 0.0
    # Schedule: "static" chooses once; "dynamic" rescores every ``update_every`` optimizer
    # steps from the dense gradients of the last ``score_window`` steps, and folds dropped
    # entries into the base weight ("merge") or discards them ("zero").
    schedule: str = "static"
    update_every: int = 128
    score_window: int = 8
    drop_policy: str = "merge"
    # ID3: unmask every ``unmask_every`` optimizer steps (same total budget), by the d3 score.
    unmask_every: int = 1
    # grow-drop (SpIEL): every ``grow_drop_every`` steps swap a fraction of the entries,
    # starting at ``grow_drop_fraction`` and decaying (cosine) to zero over training.
    grow_drop_every: int = 20
    grow_drop_fraction: float = 0.2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.method not in registry.METHODS:
            raise ConfigError(f"method={self.method!r} is not known; choose one of {', '.join(registry.METHODS)}")
        budgets = [name for name in ("density", "num_params", "match_lora_rank") if getattr(self, name) is not None]
        if not budgets:
            self.density = 0.01
        elif len(budgets) > 1:
            raise ConfigError(f"give exactly one budget, not {' and '.join(budgets)}")
        if self.density is not None:
            if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
                raise ConfigError(f"density must be a number in (0, 1], got {self.density!r}")
            if not 0.0 < float(self.density) <= 1.0:
                raise ConfigError(f"density must be in (0, 1], got {self.density}")
            self.density = float(self.density)
        for name in ("num_params", "match_lora_rank"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection={self.selection!r}; choose one of {', '.join(SELECTIONS)}")
        if self.magnitude_order not in MAGNITUDE_ORDERS:
            raise ConfigError(f"magnitude_order={self.magnitude_order!r}; choose one of {', '.join(MAGNITUDE_ORDERS)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend={self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ConfigError("target_modules is empty")
        elif not (isinstance(self.target_modules, (list, tuple)) and self.target_modules
                  and all(isinstance(t, str) and t for t in self.target_modules)):
            raise ConfigError(f"target_modules must be 'all-linear', a regex, or a non-empty list of names, got {self.target_modules!r}")
        else:
            self.target_modules = list(self.target_modules)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        for name in ("calib_examples", "calib_micro_batch", "update_every", "score_window", "unmask_every", "grow_drop_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("d3_epsilon", "d3_exponent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
            setattr(self, name, float(value))
        if self.d3_exponent > 0 and self.d3_epsilon == 0:
            raise ConfigError("d3_epsilon must be positive when d3_exponent > 0 (it guards |w| = 0)")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.drop_policy not in DROP_POLICIES:
            raise ConfigError(f"drop_policy={self.drop_policy!r}; choose one of {', '.join(DROP_POLICIES)}")
        if self.schedule == "dynamic":
            if not registry.METHODS[self.method].can_run_dynamic:
                raise ConfigError(
                    f"method={self.method!r} cannot rescore from ordinary training steps; "
                    f"schedule='dynamic' supports {', '.join(registry.names(can_run_dynamic=True))}"
                )
            if self.score_window > self.update_every:
                raise ConfigError(f"score_window ({self.score_window}) must not exceed update_every ({self.update_every})")
        f = self.grow_drop_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise ConfigError(f"grow_drop_fraction must be in [0, 1], got {f!r}")
        self.grow_drop_fraction = float(f)

    # -- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparseConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as err:  # wrong value types that dataclass itself rejects
            raise ConfigError(str(err)) from None

    def to_json_file(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        payload = {"sparse_config": self.to_dict(), **(extra or {})}
        Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
