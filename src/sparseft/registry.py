"""The methods sparseft knows, each with what it can do, what it reads and its defaults.

Config validation, ``methods.get_method``, ``scoring.SCORERS``, the CLI's ``--method``
choices and help, and ``docs/methods.md`` are all derived from ``METHODS`` and
``SCHEDULES`` below; add a method here, and there only.

A method is either a **scorer** (it scores every targeted entry and the top-k is kept;
the ``static`` schedule chooses once, ``dynamic`` rescores during training where the
scorer allows it) or a **training-time** method (its own rule changes the index set while
training). Implementations are named as ``"module:attribute"`` and imported on first
use, so that this module imports nothing else of sparseft.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

SCORER = "scorer"
TRAINING_TIME = "training-time"

# The default learning rate of the sparse values comes from a rule per family of methods
# (lr_rule.py, docs/defaults.md); each method names its family here.
DATA_FREE_FAMILY = "data-free"
GRADIENT_FAMILY = "gradient"
GROW_DROP_FAMILY = "grow-drop"


@dataclass(frozen=True)
class MethodSpec:
    """What one method is and can do.

    ``needs_calibration``: scores from calibration batches (pass ``calibration_data``).
    ``gradient_based``: reads loss gradients (at selection or during training).
    ``data_free``: needs neither data nor a forward pass of the model.
    ``can_run_dynamic``: can rescore from ordinary training steps (``schedule="dynamic"``).
    ``options``: the ``SparseConfig`` fields (dotted for option objects) it reads beyond
    the budget, targets, selection and seed that every method reads.
    ``lr_family``: the rule of ``lr_rule.py`` that gives its default learning rate.
    ``layerwise``: a layer's scores depend on that layer alone, so selection scores one
    layer at a time into a streaming top-k (one layer's scores alive, not every layer's).
    """

    name: str
    kind: str
    description: str
    implementation: str
    needs_calibration: bool = False
    gradient_based: bool = False
    data_free: bool = False
    can_run_dynamic: bool = False
    options: tuple[str, ...] = ()
    lr_family: str = GRADIENT_FAMILY
    layerwise: bool = False
    # A scorer may also choose its static index sets itself, with less memory than scoring
    # every entry first (grasp: group by group into a streaming top-k).
    selector: str = ""

    def load(self) -> Any:
        """The scorer function or Method class that implements it."""
        return _resolve(self.implementation)

    def load_selector(self) -> Any:
        """The memory-lean selection function, or None."""
        return _resolve(self.selector) if self.selector else None


def _resolve(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _scorer(name: str, description: str, function: str, **caps: Any) -> MethodSpec:
    return MethodSpec(name, SCORER, description, f"sparseft.scoring.{function}", **caps)


def _training_time(name: str, description: str, cls: str, **caps: Any) -> MethodSpec:
    return MethodSpec(name, TRAINING_TIME, description, f"sparseft.methods.{cls}", **caps)


_CALIBRATION = ("calibration.examples", "calibration.micro_batch", "calibration.memory_mb", "calibration.loss_fn")
_D3 = ("id3.d3_epsilon", "id3.d3_exponent")

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    _scorer("random", "U(0, 1) per entry, seeded: a uniform random subset (random masking)",
            "scorers:random_scores", data_free=True, can_run_dynamic=True, lr_family=DATA_FREE_FAMILY, layerwise=True),
    _scorer("magnitude", "|w|, or -|w| to prefer the smallest weights (PaFi)", "scorers:magnitude_scores",
            data_free=True, can_run_dynamic=True, options=("magnitude_order",), lr_family=DATA_FREE_FAMILY,
            layerwise=True),
    _scorer("gradient", "|g|, g the mean gradient over the calibration batches", "scorers:gradient_scores",
            needs_calibration=True, gradient_based=True, can_run_dynamic=True, options=_CALIBRATION),
    _scorer("snip", "|w g|", "scorers:snip_scores",
            needs_calibration=True, gradient_based=True, can_run_dynamic=True, options=_CALIBRATION),
    _scorer("taylor", "(w g)^2", "scorers:taylor_scores",
            needs_calibration=True, gradient_based=True, can_run_dynamic=True, options=_CALIBRATION),
    _scorer("d3", "|g| / (|w| + eps)^e, the score of ID3 (e = 0: |g|)", "scorers:d3_scores",
            needs_calibration=True, gradient_based=True, can_run_dynamic=True, options=_CALIBRATION + _D3),
    _scorer("fisher", "mean over examples of the per-example squared gradient", "scorers:fisher_scores",
            needs_calibration=True, gradient_based=True, options=_CALIBRATION),
    _scorer("grasp", "w (H g), the Hessian-gradient product (raw value, as SPEFT)", "grasp:grasp_scores",
            needs_calibration=True, gradient_based=True, options=_CALIBRATION,
            selector="sparseft.scoring.grasp:grasp_select"),
    _scorer("synflow", "|w dR/dw|, R the summed logits with every parameter made positive, on an all-ones "
            "input (no data)", "scorers:synflow_scores", gradient_based=True, can_run_dynamic=True,
            lr_family=DATA_FREE_FAMILY),
    _training_time("id3", "incremental unmasking by the d3 score from each step's batch; never drops "
                   "(B/2 entries trained on average)", "id3:ID3", gradient_based=True,
                   options=("id3.unmask_every",) + _D3),
    _training_time("dst", "dynamic subset tuning: a dense step, then keep the top density*|matrix| changes "
                   "per matrix (dense memory while training)", "dst:DST", gradient_based=True),
    _training_time("grow-drop", "SpIEL-style: periodically drop the smallest |values| and grow the largest "
                   "accumulated |g|", "grow_drop:GrowDrop", gradient_based=True, lr_family=GROW_DROP_FAMILY,
                   options=("grow_drop.every", "grow_drop.fraction", "grow_drop.score_window")),
)}

SCHEDULES: dict[str, str] = {
    "static": "choose the index set once, before training",
    "dynamic": "rescore every dynamic.update_every steps from the dense gradients of the last "
               "dynamic.score_window steps; dropped entries are merged into W or zeroed (dynamic.drop_policy)",
}


def get(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"method {name!r} is not known; choose one of {', '.join(METHODS)}") from None


def names(kind: str | None = None, **caps: bool) -> tuple[str, ...]:
    """Method names in registry order, of one kind and/or with the given capabilities,
    e.g. ``names(needs_calibration=True)``."""
    return tuple(n for n, s in METHODS.items()
                 if (kind is None or s.kind == kind) and all(getattr(s, c) == v for c, v in caps.items()))


def methods_table() -> str:
    """The Markdown table of ``docs/methods.md``."""
    def yes(flag: bool) -> str:
        return "yes" if flag else ""

    rows = ["| method | kind | calibration | dynamic | gradient | data-free | lr family | options | what it does |",
            "|---|---|---|---|---|---|---|---|---|"]
    for s in METHODS.values():
        opts = ", ".join(f"`{o}`" for o in s.options)
        rows.append(f"| {s.name} | {s.kind} | {yes(s.needs_calibration)} | {yes(s.can_run_dynamic)} | "
                    f"{yes(s.gradient_based)} | {yes(s.data_free)} | {s.lr_family} | {opts} | "
                    f"{s.description.replace('|', chr(92) + '|')} |")
    rows += ["", "| schedule | what it does |", "|---|---|"]
    rows += [f"| {name} | {text} |" for name, text in SCHEDULES.items()]
    return "\n".join(rows) + "\n"


def methods_doc() -> str:
    """The whole of ``docs/methods.md`` (regenerate: ``python -m sparseft.registry > docs/methods.md``)."""
    return ("# Methods\n\n"
            "Generated from `src/sparseft/registry.py` by `python -m sparseft.registry > docs/methods.md`;\n"
            "`tests/test_registry.py` fails when the two differ.\n\n"
            "Scorers score every targeted entry and keep the top-k (global or per layer), once\n"
            "(`schedule=\"static\"`) or, where the table says dynamic, again during training\n"
            "(`schedule=\"dynamic\"`). Training-time methods change the index set by their own rule.\n"
            "*calibration*: pass `calibration_data` (batches with labels) to `get_sparse_model`.\n"
            "*gradient*: reads loss gradients. *data-free*: needs neither data nor a model pass.\n"
            "*options*: the `SparseConfig` fields the method reads beyond the budget, targets,\n"
            "selection and seed. *lr family*: the rule that gives the default learning rate of the\n"
            "values (`lr_rule.py`, docs/defaults.md).\n\n"
            + methods_table())


def capabilities(spec: MethodSpec) -> list[str]:
    """Short words for what a method needs or allows, as ``--help`` lists them."""
    words = [spec.kind]
    words += [word for flag, word in ((spec.needs_calibration, "calibration data"), (spec.data_free, "data-free"),
                                      (spec.can_run_dynamic, "dynamic schedule")) if flag]
    return words


def methods_help() -> str:
    """One entry per method, for ``--help``."""
    return "; ".join(f"{s.name} ({', '.join(capabilities(s))}): {s.description}" for s in METHODS.values())


if __name__ == "__main__":
    print(methods_doc(), end="")
