"""SparseConfig: what to fine-tune sparsely, with what budget and which method.

Per-method options live in small option objects (``calibration``, ``dynamic``, ``id3``,
``grow_drop``). Saved configs are JSON; ``from_dict`` also reads the flat fields of
configs saved before the option objects existed.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

from . import registry


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


# Which methods exist and what each can do: registry.METHODS.
SCHEDULES = tuple(registry.SCHEDULES)
DROP_POLICIES = ("merge", "zero")
SELECTIONS = ("global", "per-layer")
MAGNITUDE_ORDERS = ("largest", "smallest")
BACKENDS = ("auto", "native", "sampled_addmm", "gather", "dense")
# "entry": any entries; "tile16"/"tile32": whole aligned 16x16 / 32x32 tiles (sparseft/tiles.py).
GRANULARITIES = ("entry", "tile16", "tile32")
# A quantized frozen base (sparseft.quant): 4-bit NF4 or 8-bit int8, via bitsandbytes.
QUANTIZE_FORMATS = ("nf4", "int8")
# Methods that need the base weights in full precision (DST trains every entry of a silo densely).
DENSE_BASE_METHODS = ("dst",)


def dense_base_refusal(method: str) -> str:
    return (f"method={method!r} cannot train on a quantized base: it updates every entry of each targeted "
            "matrix (dense values, gradients and optimizer state as large as the float weights), so a "
            "4-bit/8-bit base saves nothing and its projection to pretrained values needs the float weights; "
            "use another method with quantize, or a float base with dst")
# The budget when none is given: this fraction of the targeted weights (select.resolve_budget).
DEFAULT_DENSITY = 0.01
# What a saved config holds in place of a callable (target_modules, calibration.loss_fn):
# code is not saved. An adapter records its target names itself, so loading one works;
# building a new sparse model from such a config needs the callable passed again.
CALLABLE = "callable"
# calibration.micro_batch chosen from calibration.memory_mb (scoring.calibration.resolve_micro_batch)
AUTO_MICRO_BATCH = "auto"

TargetFilter = Callable[[Any, str], bool]
LossFn = Callable[[Any, Any], Any]


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


def _positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner}{name} must be a positive integer, got {value!r}")


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


@dataclass
class CalibrationOptions:
    """How the calibration-based scorers (registry: needs_calibration) read their data."""

    examples: int = _help("calibration examples (the application takes the first N of the training split in "
                          "a seeded order, capped by its size)", default=1024)
    micro_batch: Union[int, str] = _help(
        "examples per forward/backward pass while scoring: each calibration batch runs in micro-batches of at most "
        "this many, weighted so that the gradient is the batch's own (selection memory does not grow with the "
        "batch size; fisher always uses 1). 'auto': as many as fit in memory_mb of activations, measured on one "
        "example of the longest calibration batch (grasp: 1)", default="auto")
    memory_mb: float = _help("with micro_batch='auto': the activations (tensors autograd saves for the backward "
                             "pass) one micro-batch may hold, in MiB", default=256.0)
    loss_fn: Union[LossFn, str, None] = _help(
        "loss_fn(model, batch) -> scalar loss, for models whose forward does not return .loss "
        "(default: model(**batch).loss). Not saved: a saved config holds 'callable'", default=None)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _positive_int("calibration.", "examples", self.examples)
        if self.micro_batch != AUTO_MICRO_BATCH:
            _positive_int("calibration.", "micro_batch", self.micro_batch)
        if not _number(self.memory_mb) or not self.memory_mb > 0:
            raise ConfigError(f"calibration.memory_mb must be a positive number, got {self.memory_mb!r}")
        if not (self.loss_fn is None or self.loss_fn == CALLABLE or callable(self.loss_fn)):
            raise ConfigError(f"calibration.loss_fn must be a callable (model, batch) -> loss, got {self.loss_fn!r}")


@dataclass
class DynamicOptions:
    """The dynamic schedule (``schedule="dynamic"``): rescore and move the index sets."""

    update_every: int = _help("optimizer steps between rescorings", default=128)
    score_window: int = _help("rescore from the dense gradients of this many steps before each update "
                              "(the other steps run the sparse path only)", default=8)
    drop_policy: str = _help("dropped entries: 'merge' folds them into the base weight (recorded in the "
                             "adapter), 'zero' discards them", default="merge")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("update_every", "score_window"):
            _positive_int("dynamic.", name, getattr(self, name))
        if self.drop_policy not in DROP_POLICIES:
            raise ConfigError(f"dynamic.drop_policy={self.drop_policy!r}; choose one of {', '.join(DROP_POLICIES)}")


@dataclass
class ID3Options:
    """ID3 and the d3 score |g| / (|w| + d3_epsilon) ** d3_exponent (also the d3 scorer's)."""

    # 4: as accurate as every step on bbc-topic (3 seeds) at about a quarter of the dense-gradient steps
    # (docs/dynamic_methods.md)
    unmask_every: int = _help("unmask every K optimizer steps (same total budget; fewer dense-gradient steps; "
                              "1: every step)", default=4)
    d3_epsilon: float = _help("epsilon of the d3 score (guards |w| = 0)", default=1e-3)
    d3_exponent: float = _help("exponent e of the d3 score (0: d3 is |g|)", default=0.0)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _positive_int("id3.", "unmask_every", self.unmask_every)
        for name in ("d3_epsilon", "d3_exponent"):
            value = getattr(self, name)
            if not _number(value) or not 0 <= value < float("inf"):
                raise ConfigError(f"id3.{name} must be a finite number >= 0, got {value!r}")
        if self.d3_exponent > 0 and self.d3_epsilon == 0:
            raise ConfigError("id3.d3_epsilon must be positive when id3.d3_exponent > 0 (it guards |w| = 0)")


@dataclass
class GrowDropOptions:
    """grow-drop (SpIEL): periodic swaps of a decaying fraction of the entries."""

    every: int = _help("swap entries every N optimizer steps", default=20)
    fraction: float = _help("fraction swapped at the start, decaying (cosine) to 0 over training", default=0.2)
    score_window: int = _help("grow by the dense gradients of this many steps before each swap", default=8)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _positive_int("grow_drop.", "every", self.every)
        _positive_int("grow_drop.", "score_window", self.score_window)
        if not _number(self.fraction) or not 0 <= self.fraction <= 1:
            raise ConfigError(f"grow_drop.fraction must be in [0, 1], got {self.fraction!r}")


OPTION_TYPES = {"calibration": CalibrationOptions, "dynamic": DynamicOptions, "id3": ID3Options,
                "grow_drop": GrowDropOptions}
# The flat fields of configs saved before the option objects: (option object, its field).
FLAT_FIELDS = {
    "calib_examples": (("calibration", "examples"),),
    "calib_micro_batch": (("calibration", "micro_batch"),),
    "update_every": (("dynamic", "update_every"),),
    "score_window": (("dynamic", "score_window"), ("grow_drop", "score_window")),
    "drop_policy": (("dynamic", "drop_policy"),),
    "unmask_every": (("id3", "unmask_every"),),
    "d3_epsilon": (("id3", "d3_epsilon"),),
    "d3_exponent": (("id3", "d3_exponent"),),
    "grow_drop_every": (("grow_drop", "every"),),
    "grow_drop_fraction": (("grow_drop", "fraction"),),
}


@dataclass
class SparseConfig:
    """Everything needed to rebuild a sparse fine-tune on top of a base model.

    At most one budget: ``density``, ``num_params`` or ``match_lora_rank``; with none,
    ``DEFAULT_DENSITY`` applies where the budget is resolved (``select.resolve_budget``).
    Validation checks and never fills anything in, so ``dataclasses.replace`` works
    (e.g. ``replace(SparseConfig(), num_params=1000)``).
    """

    method: str = _help("how entries are chosen: a name in sparseft.registry.METHODS (docs/methods.md)",
                        default="random")
    density: float | None = _help(f"budget: fraction of the targeted weights, in (0, 1] (default "
                                  f"{DEFAULT_DENSITY} when no budget is given)", default=None)
    num_params: int | None = _help("budget: absolute number of trained entries", default=None)
    match_lora_rank: int | None = _help("budget: as many entries as LoRA of this rank on the same targets",
                                        default=None)
    target_modules: Union[str, list[str], TargetFilter] = _help(
        "'all-linear' (every Linear/Conv1D but the output head), a regex on module names, a list of name "
        "suffixes, or filter_fn(module, name) -> bool (not saved: a saved config holds 'callable')",
        default="all-linear")
    exclude_modules: list[str] = _help("name suffixes never targeted", default_factory=list)
    selection: str = _help("'global': one top-k over all targets; 'per-layer': a share per matrix",
                           default="global")
    magnitude_order: str = _help("magnitude: keep the 'largest' |w|, or the 'smallest' (PaFi)", default="largest")
    seed: int = _help("seeds the random scorer (and what else draws numbers in a method)", default=0)
    modules_to_save: list[str] = _help("modules trained densely and saved with the adapter (default: the "
                                       "model's task heads, which the checkpoint lacks)", default_factory=list)
    train_bias: bool = _help("also train the biases of targeted layers (densely)", default=False)
    backend: str = _help("SDDMM backend of the values' gradient: auto, native, sampled_addmm, gather, dense",
                         default="auto")
    granularity: str = _help("mask structure: 'entry' (any entries), or whole aligned 16x16 / 32x32 tiles "
                             "('tile16', 'tile32'): scores pooled by tile mean, the budget still counts entries "
                             "(docs/gpu.md)", default="entry")
    schedule: str = _help("scorers: 'static' chooses once; 'dynamic' rescores during training (see dynamic)",
                          default="static")
    calibration: CalibrationOptions = _help("calibration data of the scorers that need it",
                                            default_factory=CalibrationOptions)
    dynamic: DynamicOptions = _help("the dynamic schedule", default_factory=DynamicOptions)
    id3: ID3Options = _help("ID3 and the d3 score", default_factory=ID3Options)
    grow_drop: GrowDropOptions = _help("grow-drop swaps", default_factory=GrowDropOptions)
    quantize: str | None = _help("keep the targeted layers' frozen weights quantized: 'nf4' or 'int8' "
                                 "(bitsandbytes; docs/quantized.md); None keeps them as loaded", default=None)

    def __post_init__(self) -> None:
        for name, kind in OPTION_TYPES.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _options_from_dict(kind, value, name))
            elif not isinstance(value, kind):
                raise ConfigError(f"{name} must be a {kind.__name__} (or a dict of its fields), got {value!r}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first invalid field; changes nothing."""
        if self.method not in registry.METHODS:
            raise ConfigError(f"method={self.method!r} is not known; choose one of {', '.join(registry.METHODS)}")
        budgets = [name for name in ("density", "num_params", "match_lora_rank") if getattr(self, name) is not None]
        if len(budgets) > 1:
            raise ConfigError(f"give exactly one budget, not {' and '.join(budgets)}")
        if self.density is not None:
            if not _number(self.density):
                raise ConfigError(f"density must be a number in (0, 1], got {self.density!r}")
            if not 0.0 < float(self.density) <= 1.0:
                raise ConfigError(f"density must be in (0, 1], got {self.density}")
        for name in ("num_params", "match_lora_rank"):
            value = getattr(self, name)
            if value is not None:
                _positive_int("", name, value)
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection={self.selection!r}; choose one of {', '.join(SELECTIONS)}")
        if self.magnitude_order not in MAGNITUDE_ORDERS:
            raise ConfigError(f"magnitude_order={self.magnitude_order!r}; choose one of {', '.join(MAGNITUDE_ORDERS)}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity={self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend={self.backend!r}; choose one of {', '.join(BACKENDS)}")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise ConfigError("target_modules is empty")
        elif not callable(targets) and not (isinstance(targets, list) and targets
                                            and all(isinstance(t, str) and t for t in targets)):
            raise ConfigError("target_modules must be 'all-linear', a regex, a non-empty list of names, or a "
                              f"filter_fn(module, name) -> bool, got {targets!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in OPTION_TYPES:
            getattr(self, name).validate()
        if self.schedule == "dynamic":
            if not registry.get(self.method).can_run_dynamic:
                raise ConfigError(
                    f"method={self.method!r} cannot rescore from ordinary training steps; "
                    f"schedule='dynamic' supports {', '.join(registry.names(can_run_dynamic=True))}"
                )
            if self.dynamic.score_window > self.dynamic.update_every:
                raise ConfigError(f"dynamic.score_window ({self.dynamic.score_window}) must not exceed "
                                  f"dynamic.update_every ({self.dynamic.update_every})")

        if self.quantize is not None:
            if self.quantize not in QUANTIZE_FORMATS:
                raise ConfigError(f"quantize={self.quantize!r}; choose one of {', '.join(QUANTIZE_FORMATS)} (or None)")
            if self.method in DENSE_BASE_METHODS:
                raise ConfigError(dense_base_refusal(self.method))

    # -- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; callables (a target filter, a loss function) become ``"callable"``."""
        data = dataclasses.asdict(self)
        if callable(self.target_modules):
            data["target_modules"] = CALLABLE
        if callable(self.calibration.loss_fn):
            data["calibration"]["loss_fn"] = CALLABLE
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparseConfig":
        """The config of ``to_dict``'s output, or of an older saved config with flat fields."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        options: dict[str, dict[str, Any]] = {}
        for flat, places in FLAT_FIELDS.items():
            if flat in data:
                value = data.pop(flat)
                for owner, name in places:
                    options.setdefault(owner, {})[name] = value
        for owner, values in options.items():
            nested = data.get(owner, {})
            if not isinstance(nested, dict):
                raise ConfigError(f"{owner} must be a JSON object, got {nested!r}")
            data[owner] = {**values, **nested}
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


def _options_from_dict(kind: type, data: dict[str, Any], owner: str) -> Any:
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {owner} field(s): {', '.join(unknown)}")
    return kind(**data)


def field_help(cls: type = SparseConfig) -> dict[str, str]:
    """The ``help`` text of every field, nested ones as ``owner.field``."""
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = f.metadata.get("help", "")
        if f.name in OPTION_TYPES:
            out.update({f"{f.name}.{k}": v for k, v in field_help(OPTION_TYPES[f.name]).items()})
    return out
