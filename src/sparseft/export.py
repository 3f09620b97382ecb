"""Export a sparse fine-tune for tools that know nothing of sparseft.

- ``save_merged``: a plain transformers model folder (W + S written into the weights),
  loadable by ``AutoModel*.from_pretrained``: the route to lm-evaluation-harness, vLLM and
  llama.cpp's converter.
- ``save_peft``: a folder that stock ``peft.PeftModel.from_pretrained`` loads, through
  peft's Super-Tuning tuner (``SupertuningConfig``), which stores the same flat int32
  index and values per weight. See ``peft_export_problems`` for when that is possible.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .inject import _parent_and_child
from .model import SparseModel

PEFT_PREFIX = "base_model.model."


class ExportError(ValueError):
    """The adapter cannot be written in the requested format."""


@contextlib.contextmanager
def _merged_plain(model: SparseModel) -> Iterator[nn.Module]:
    """The base model with the deltas merged and the plain layers back in place of the
    wrapped ones; on exit the SparseModel is as it was (unmerged bit for bit)."""
    layers = model.sparse_layers()
    was_merged = {name: layer.merged for name, layer in layers.items()}
    for layer in layers.values():
        layer.merge()
    for name, layer in layers.items():
        parent, child = _parent_and_child(model.model, name)
        setattr(parent, child, layer.base_layer)
    try:
        yield model.model
    finally:
        for name, layer in layers.items():
            parent, child = _parent_and_child(model.model, name)
            setattr(parent, child, layer)
            if not was_merged[name]:
                layer.unmerge()


def save_merged(model: SparseModel, path: str | os.PathLike, tokenizer: Any = None,
                max_shard_size: str | int = "5GB") -> Path:
    """Write the fine-tuned model as a plain transformers folder (``config.json`` +
    ``model.safetensors``): the base weights with the sparse deltas (and any folded
    entries) added, the task heads as trained. ``model`` itself is left unchanged."""
    out = Path(path)
    with _merged_plain(model) as plain:
        plain.save_pretrained(out, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def layer_entries(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted int64 positions, values) of a layer's whole delta from the pristine base
    weight: its live entries plus the entries a dynamic schedule folded into the weight
    (a position in both carries the sum)."""
    idx, vals = layer.indices.long(), layer.values.detach()
    if not layer.num_folded:
        return idx, vals
    folded_idx = layer.folded_indices.long()
    union = torch.unique(torch.cat([idx, folded_idx]))
    total = torch.zeros(union.numel(), dtype=torch.float64, device=union.device)
    total.index_add_(0, torch.searchsorted(union, idx), vals.double())
    total.index_add_(0, torch.searchsorted(union, folded_idx), layer.folded_values.double())
    return union, total.to(vals.dtype)


def peft_export_problems(model: SparseModel) -> list[str]:
    """Why ``save_peft`` cannot write this model (empty: it can).

    peft's Super-Tuning layer wraps ``torch.nn.Linear`` only (not GPT-2's ``Conv1D``),
    keeps its values in float32 and applies them to a floating-point weight, and has one
    ``sparsity`` for every layer (each layer holds ``int(numel * (1 - sparsity))`` entries).
    Index sets of different sizes are padded with zero-valued entries up to that count,
    which changes no output but makes the file larger (``peft_padding``).
    """
    problems = []
    for name, layer in model.sparse_layers().items():
        if type(layer.base_layer) is not nn.Linear:
            problems.append(f"{name} is a {type(layer.base_layer).__name__}: peft's Super-Tuning wraps nn.Linear only")
        elif not layer.weight.is_floating_point():
            problems.append(f"{name} has a {layer.weight.dtype} weight: Super-Tuning needs a floating-point one")
    if any(layer.merged for layer in model.sparse_layers().values()):
        problems.append("the deltas are merged into the weights: unmerge first")
    return problems


def _common_sparsity(counts: dict[str, tuple[int, int]]) -> float:
    """The largest Super-Tuning ``sparsity`` s with int(numel * (1 - s)) >= entries for
    every layer (and at least one entry per layer, which Super-Tuning requires)."""
    density = max(max(n, 1) / numel for n, numel in counts.values())
    sparsity = 1.0 - density
    while sparsity > 0.0 and any(int(numel * (1 - sparsity)) < max(n, 1) for n, numel in counts.values()):
        sparsity = max(0.0, sparsity - max(1e-15, sparsity * 1e-12))
    return sparsity


def peft_padding(model: SparseModel) -> dict[str, int]:
    """Zero-valued entries ``save_peft`` adds to each layer to reach the common count."""
    counts = {name: (layer_entries(layer)[0].numel(), layer.weight.numel()) for name, layer in model.sparse_layers().items()}
    sparsity = _common_sparsity(counts)
    return {name: int(numel * (1 - sparsity)) - n for name, (n, numel) in counts.items()}


def save_peft(model: SparseModel, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in peft's Super-Tuning
    format, so that ``peft.PeftModel.from_pretrained(base, path)`` applies the same delta.

    Possible when every targeted layer is an ``nn.Linear`` with a floating-point weight and
    the deltas are not merged (``peft_export_problems``). Folded entries (a dynamic
    schedule's dropped entries, ``drop_policy="merge"``) are written as ordinary entries.
    Task heads (``modules_to_save``) go into peft's ``modules_to_save``. Index sets are
    padded with zero-valued entries to one common count per layer (``peft_padding``).
    """
    from .quant import quiet_bitsandbytes_import

    with quiet_bitsandbytes_import():
        from peft import SupertuningConfig

    problems = peft_export_problems(model)
    if problems:
        raise ExportError("cannot write a peft Super-Tuning adapter: " + "; ".join(problems))
    layers = model.sparse_layers()
    entries = {name: layer_entries(layer) for name, layer in layers.items()}
    sparsity = _common_sparsity({name: (idx.numel(), layers[name].weight.numel()) for name, (idx, _) in entries.items()})
    tensors = {}
    for name, (idx, vals) in entries.items():
        numel = layers[name].weight.numel()
        want = int(numel * (1 - sparsity))
        free = torch.ones(numel, dtype=torch.bool, device=idx.device)
        free[idx] = False
        pad = torch.nonzero(free).flatten()[: want - idx.numel()]
        key = f"{PEFT_PREFIX}{name}"
        tensors[f"{key}.supertuning_indices"] = torch.cat([idx, pad]).to("cpu", torch.int32).contiguous()
        tensors[f"{key}.supertuning_values"] = torch.cat(
            [vals.float(), torch.zeros(pad.numel(), dtype=torch.float32, device=vals.device)]).cpu().contiguous()
    for head in model.modules_to_save:
        for pname, p in model.model.get_submodule(head).state_dict().items():
            tensors[f"{PEFT_PREFIX}{head}.{pname}"] = p.detach().cpu().contiguous()
    base_cfg = getattr(model.model, "config", None)
    config = SupertuningConfig(
        target_modules=list(layers), sparsity=sparsity, modules_to_save=list(model.modules_to_save) or None,
        base_model_name_or_path=base_model_name_or_path or getattr(base_cfg, "_name_or_path", None) or None,
        inference_mode=True,
    )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
