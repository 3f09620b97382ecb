"""SparseConfig: what to fine-tune sparsely, with what budget and which method."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


# Methods that pick their index set once, before training, from the weights alone.
STATIC_METHODS = ("random", "magnitude")
# Methods whose index set changes during training (methods/id3.py, dst.py, grow_drop.py).
TRAINING_TIME_METHODS = ("id3", "dst", "grow-drop")
KNOWN_METHODS = STATIC_METHODS + TRAINING_TIME_METHODS
SELECTIONS = ("global", "per-layer")
MAGNITUDE_ORDERS = ("largest", "smallest")
BACKENDS = ("auto", "sampled_addmm", "gather")


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
    # ID3: unmask every ``unmask_every`` optimizer steps (same total budget), choosing by the
    # d3 score |g| / (|w| + d3_epsilon) ** d3_exponent.
    unmask_every: int = 1
    d3_epsilon: float = 1e-3
    d3_exponent: float = 0.0
    # grow-drop (SpIEL): every ``grow_drop_every`` steps swap a fraction of the entries,
    # starting at ``grow_drop_fraction`` and decaying (cosine) to zero over training.
    grow_drop_every: int = 20
    grow_drop_fraction: float = 0.2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.method not in KNOWN_METHODS:
            raise ConfigError(f"method={self.method!r} is not known; choose one of {', '.join(KNOWN_METHODS)}")
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
        for name in ("unmask_every", "grow_drop_every"):
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
