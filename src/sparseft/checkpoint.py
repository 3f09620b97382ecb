"""Training checkpoints: everything needed to continue a run bit for bit.

A checkpoint is a folder ``checkpoint-<step>`` holding the adapter (indices, values,
task heads; for any other model, such as a LoRA baseline, its trainable parameters by
name), the optimizer's per-entry state, and ``state.json`` (scheduler, method, data
position, RNG states). It is written under a temporary name, fsynced, and renamed
into place, so a crash mid-save never leaves a half-written "latest" checkpoint: the
newest complete folder is always the one loaded. Only safetensors and JSON are read
back; nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import AdapterError, SparseModel, _load_tensors, read_adapter

PREFIX = "checkpoint-"
STATE_NAME = "state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng.safetensors"
METHOD_NAME = "method.safetensors"
TRAINABLE_NAME = "trainable.safetensors"  # models other than a SparseModel


class CheckpointError(RuntimeError):
    pass


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors, groups = {}, []
    for g, group in enumerate(optimizer.param_groups):
        groups.append({k: v for k, v in group.items() if k != "params"})
        for i, p in enumerate(group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{g}.{i}.{key}"] = value.detach().cpu().contiguous()
    return tensors, groups


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError("the checkpoint's optimizer has a different number of parameter groups")
    for g, (group, saved) in enumerate(zip(optimizer.param_groups, groups)):
        for key, value in saved.items():
            group[key] = tuple(value) if key == "betas" else value
        for i, p in enumerate(group["params"]):
            state = {}
            for name, tensor in tensors.items():
                gi, pi, key = name.split(".", 2)
                if int(gi) == g and int(pi) == i:
                    if key != "step" and tensor.shape != p.shape:
                        raise CheckpointError(f"optimizer state {name} does not fit its parameter")
                    state[key] = tensor.to(p.device)
            if state:
                optimizer.state[p] = state


def _split_tensors(state: Any, tensors: dict[str, torch.Tensor], path: str = "m") -> Any:
    """JSON-able copy of a method's state; its tensors move to ``tensors`` by key."""
    if isinstance(state, torch.Tensor):
        tensors[path] = state.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(state, dict):
        return {str(k): _split_tensors(v, tensors, f"{path}.{k}") for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(state)]
    return state


def _join_tensors(state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(state, dict):
        if set(state) == {"__tensor__"}:
            return tensors[state["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in state.items()}
    if isinstance(state, list):
        return [_join_tensors(v, tensors) for v in state]
    return state


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    py_state = random.getstate()
    return {"torch": torch.get_rng_state()}, {"python": [py_state[0], list(py_state[1]), py_state[2]]}


def _restore_rng(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))


def _save_trained(model: Any, folder: Path) -> None:
    """A SparseModel's adapter; for any other model (a baseline, a dense fine-tune) every
    trainable parameter by name."""
    if isinstance(model, SparseModel):
        model.save_pretrained(folder / "adapter")
    else:
        trained = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trained, str(folder / TRAINABLE_NAME))


def _read_trained(model: Any, folder: Path) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    if isinstance(model, SparseModel):
        return read_adapter(folder / "adapter")
    return None, load_file(str(folder / TRAINABLE_NAME))


def _load_trained(model: Any, meta: dict[str, Any] | None, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    if isinstance(model, SparseModel):
        layers = model.sparse_layers()
        if set(meta["targets"]) != set(layers):
            raise CheckpointError(f"checkpoint {folder} targets other modules than this model")
        for layer in layers.values():
            layer.restore_base()  # folds are replayed from the checkpoint's record onto W0
        _load_tensors(model, tensors)
        return
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(trainable):
        raise CheckpointError(f"checkpoint {folder} holds other trainable parameters than this model")
    with torch.no_grad():
        for name, param in trainable.items():
            if tensors[name].shape != param.shape:
                raise CheckpointError(f"checkpoint {folder}: {name} has another shape than this model's")
            param.copy_(tensors[name])


def save_checkpoint(
    root: str | os.PathLike, step: int, model: SparseModel, optimizer: torch.optim.Optimizer,
    scheduler: Any, loop_state: dict[str, Any], generator: torch.Generator | None = None, keep_last: int = 3,
) -> Path:
    """Write ``root/checkpoint-<step>`` atomically and prune all but the ``keep_last`` newest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _save_trained(model, tmp)
        opt_tensors, opt_groups = _optimizer_tensors(optimizer)
        save_file(opt_tensors, str(tmp / OPTIMIZER_NAME))
        rng_tensors, rng_info = _rng_state()
        if generator is not None:
            rng_tensors["data"] = generator.get_state()
        if loop_state.get("epoch_generator_state") is not None:
            rng_tensors["epoch_data"] = loop_state["epoch_generator_state"]
        save_file(rng_tensors, str(tmp / RNG_NAME))
        method = getattr(model, "method", None)
        method_tensors: dict[str, torch.Tensor] = {}
        method_state = _split_tensors(method.state_dict(), method_tensors) if method is not None else {}
        save_file(method_tensors, str(tmp / METHOD_NAME))
        state = {
            "step": step,
            "loop": {k: v for k, v in loop_state.items() if k != "epoch_generator_state"},
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "optimizer_groups": opt_groups,
            "method": method_state,
            "rng": rng_info,
        }
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := re.fullmatch(rf"{PREFIX}(\d+)", p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(
    folder: str | os.PathLike, model: SparseModel, optimizer: torch.optim.Optimizer, scheduler: Any,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Restore model values, optimizer, scheduler, method and RNG state; returns the loop state."""
    folder = Path(folder)
    try:
        state = json.loads((folder / STATE_NAME).read_text())
        meta, tensors = _read_trained(model, folder)
        opt_tensors = load_file(str(folder / OPTIMIZER_NAME))
        rng_tensors = load_file(str(folder / RNG_NAME))
        method_tensors = load_file(str(folder / METHOD_NAME))
    except (OSError, json.JSONDecodeError, AdapterError, SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {folder} cannot be read: {err}") from None
    _load_trained(model, meta, tensors, folder)
    _restore_optimizer(optimizer, opt_tensors, state["optimizer_groups"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    method = getattr(model, "method", None)
    if method is not None:
        method.load_state_dict(_join_tensors(state["method"], method_tensors))
    _restore_rng(rng_tensors, state["rng"])
    if generator is not None and "data" in rng_tensors:
        generator.set_state(rng_tensors["data"])
    loop = dict(state["loop"])
    loop["epoch_generator_state"] = rng_tensors.get("epoch_data")
    return loop
