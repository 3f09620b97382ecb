"""Find target modules, wrap them with sparse deltas, and unwrap them again."""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch.nn as nn

from .config import CALLABLE, ConfigError
from .delta import SparseDeltaLayer, is_conv1d
from .quant import is_quantized

# Heads that task-specific model classes add on top of a pretrained body. They are
# usually missing from the checkpoint, so they are trained densely (peft does the same).
TASK_HEAD_NAMES = ("classifier", "score", "qa_outputs")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the language-model output projection (left out by ``all-linear``)."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        names.update(n for n, m in model.named_modules() if m is head)
    return names


def default_modules_to_save(model: nn.Module) -> list[str]:
    """Task heads of the model (``classifier``, ``score``, ``qa_outputs``), if present."""
    return [name for name, _ in model.named_children() if name in TASK_HEAD_NAMES]


def _matches(name: str, patterns: str | list[str]) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def find_target_modules(
    model: nn.Module,
    target_modules: str | list[str] | Callable[[nn.Module, str], bool],
    exclude_modules: Iterable[str] = (),
    modules_to_save: Iterable[str] = (),
) -> list[str]:
    """Names of the Linear/Conv1D modules to wrap, in model order.

    ``target_modules``: ``"all-linear"``, a regex (full match), a list of name suffixes, or
    ``filter_fn(module, name) -> bool``, asked for every Linear/Conv1D not excluded and not
    in ``modules_to_save``.
    """
    if target_modules == CALLABLE:
        raise ConfigError("target_modules was a filter_fn, which a saved config does not hold: pass the "
                          "function again, or the module names (an adapter records its targets itself)")
    exclude = list(exclude_modules)
    skip = set(modules_to_save)
    if target_modules == "all-linear":
        skip |= output_head_names(model)
    found, matched_other = [], []
    for name, module in model.named_modules():
        if not name or _under(name, skip) or (exclude and _matches(name, exclude)):
            continue
        if callable(target_modules):
            if not isinstance(module, SparseDeltaLayer) and not (is_linear_like(module) and target_modules(module, name)):
                continue
        elif target_modules != "all-linear" and not _matches(name, target_modules):
            continue
        if isinstance(module, SparseDeltaLayer):
            raise ConfigError(f"module {name!r} already carries a sparse delta")
        if is_linear_like(module):
            found.append(name)
        elif target_modules != "all-linear":
            matched_other.append(f"{name} ({type(module).__name__})")
    if not found:
        hint = f"; matched only non-linear modules: {', '.join(matched_other[:5])}" if matched_other else ""
        raise ConfigError(f"no Linear/Conv1D module matches target_modules={target_modules!r}{hint}")
    return found


def _parent_and_child(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def make_delta_layer(module: nn.Module, backend: str = "auto") -> SparseDeltaLayer:
    """A sparse delta around ``module``: the quantized-base layer for a bitsandbytes layer."""
    if is_quantized(module):
        from .delta.quantized import QuantizedSparseDeltaLayer

        return QuantizedSparseDeltaLayer(module, backend=backend)
    return SparseDeltaLayer(module, backend=backend)


def wrap_modules(model: nn.Module, names: Iterable[str], backend: str = "auto") -> dict[str, SparseDeltaLayer]:
    """Replace each named module by a ``SparseDeltaLayer`` around it (empty index)."""
    wrapped = {}
    for name in names:
        parent, child = _parent_and_child(model, name)
        layer = make_delta_layer(getattr(parent, child), backend=backend)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped


def unwrap_modules(model: nn.Module, merge: bool) -> nn.Module:
    """Put the base layers back, writing the deltas into them first when ``merge``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseDeltaLayer):
            if merge:
                module.merge()
                module._merged_original = None  # the merge is now permanent
            else:
                module.unmerge()
                module.restore_base()  # entries a dynamic schedule folded into W
            parent, child = _parent_and_child(model, name)
            setattr(parent, child, module.base_layer)
    return model
