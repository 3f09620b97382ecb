"""The default learning rate of the sparse values (``lr="auto"``).

A sparse fine-tune's good rate depends on how many entries it trains: a random mask's
few entries need a large rate and many a small one (a rate tuned at one budget collapses
at a budget 4x larger). A gradient mask's best rate falls with the budget too, more
slowly, and falls on a larger model.
The rule is a power law in the density (trained entries / targeted weights) and, for a
model larger than the reference, in the number of targeted weights, one per method family,
clipped to a safe range:

    lr = LR_AT_REF * (density / REF_DENSITY) ** -EXPONENT * max(1, targeted / REF_TARGETED) ** -SIZE_EXPONENT

docs/defaults.md gives the data behind the constants and what they were not tested on.
"""
from __future__ import annotations

from typing import Any

from . import registry
from .config import DEFAULT_DENSITY, ConfigError, SparseConfig

AUTO = "auto"

# A LoRA-rank-4 budget on all-linear MiniLM-L6: 168,960 of its 10,764,288 targeted weights.
REF_TARGETED = 10_764_288
REF_DENSITY = 168_960 / REF_TARGETED

# family -> (rate at REF_DENSITY, exponent of the density, exponent of the targeted weights),
# from the best rates on validation of learning-rate sweeps (docs/defaults.md).
# data-free: random masking on bbc-topic at r1, r4, r16, r64 (0.0177, 0.00625, 0.0022, 0.0008),
# grow-drop there at r4 (0.00625) and random masking on rt-gen with SmolLM2-135M at r16 (0.0028):
# least squares 6.26e-3 and 0.745, rounded to 6.25e-3 and 0.75.
# grow-drop: its own sweeps on bbc-topic at r1, r4, r16, r64 (best 0.0177, 0.00625, 0.0011,
# 0.0004) and on rt-sentiment's whole training split at r4 and r16 (0.0016, 0.0011). Above its
# best rate it collapses to the majority class (at the data-free rule's rate on rt-sentiment at
# r4, on one seed of three), below it it loses little; so it takes a quarter of the data-free
# rule's rate, at or below its best rate in every sweep.
# gradient: gradient masks, ID3 and DST on bbc-topic at r1, r4, r16 (and gradient masks at r64),
# gradient masks on rt-sentiment at r1, r4, r16 and on bbc-lm with SmolLM2-135M at r16, seed 0:
# least squares 1.96e-3 and 0.47, rounded to 2e-3 and 0.5. With rt-gen added and the size
# fitted too, 2.08e-3, 0.44 and 0.54: the size exponent comes from SmolLM2-135M (106 M
# targeted weights), whose best rates at r16 were 0.0005 (bbc-lm) and 0.00029 (rt-gen), a
# third of what the density alone gives. Rounded to 2e-3, 0.5 and 0.5: on a model at least
# as large as the reference the rate follows the number of trained entries.
RULES: dict[str, tuple[float, float, float]] = {
    # random, magnitude, synflow
    registry.DATA_FREE_FAMILY: (6.25e-3, 0.75, 0.0),
    registry.GROW_DROP_FAMILY: (6.25e-3 / 4, 0.75, 0.0),
    # gradient, snip, taylor, d3, fisher, grasp; id3 and dst choose by gradients
    registry.GRADIENT_FAMILY: (2e-3, 0.5, 0.5),
}
# method -> family: declared by each method in the registry.
FAMILY = {name: spec.lr_family for name, spec in registry.METHODS.items()}
LR_MIN, LR_MAX = 1e-4, 5e-2


def rule_lr(method: str, density: float, targeted: int | None = None) -> float:
    """The rule's rate for ``method`` training ``density`` of its ``targeted`` weights.

    Without ``targeted``, and for a model smaller than the reference, the model is taken
    as the reference's size: the rule was not measured below it.
    """
    if method not in FAMILY:
        raise ConfigError(f"no default learning rate for method={method!r}; give one (--lr)")
    if not 0 < density <= 1:
        raise ConfigError(f"density must be in (0, 1], got {density!r}")
    if targeted is not None and targeted < 1:
        raise ConfigError(f"targeted weights must be at least 1, got {targeted!r}")
    at_ref, exponent, size_exponent = RULES[FAMILY[method]]
    larger = 1.0 if targeted is None else max(1.0, targeted / REF_TARGETED)
    rate = at_ref * (density / REF_DENSITY) ** -exponent * larger ** -size_exponent
    return float(min(LR_MAX, max(LR_MIN, rate)))


def default_lr(config: SparseConfig, model: Any = None) -> float:
    """The default rate of the sparse values for ``config`` on ``model``.

    ``model`` is the SparseModel that ``config`` built (its targets give the number of
    targeted weights and turn a ``num_params`` or ``match_lora_rank`` budget into a
    density); it may be left out when the budget is a ``density``, and the model is then
    taken to be no larger than the reference.
    """
    if model is not None and hasattr(model, "target_shapes"):
        from .select import resolve_budget

        shapes = model.target_shapes()
        targeted = sum(o * i for o, i in shapes.values())
        return rule_lr(config.method, resolve_budget(config, shapes) / targeted, targeted)
    if config.num_params is None and config.match_lora_rank is None:
        return rule_lr(config.method, DEFAULT_DENSITY if config.density is None else config.density)
    raise ConfigError("the default learning rate of a num_params or match_lora_rank budget needs the sparse model "
                      "(default_lr(config, model)); or give a rate")


def resolve_lr(lr: float | str, model: Any) -> float:
    """``lr`` itself, or the rule's rate for ``model`` (a SparseModel) when it is ``"auto"``."""
    if lr != AUTO:
        return float(lr)
    config = getattr(model, "sparse_config", None)
    if not isinstance(config, SparseConfig):
        raise ConfigError("lr='auto' needs a SparseModel (get_sparse_model); give this model a learning rate")
    return default_lr(config, model)
