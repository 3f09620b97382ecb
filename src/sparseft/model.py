"""SparseModel: a base model whose targeted weights carry sparse deltas."""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._version import __version__
from .config import ConfigError, SparseConfig
from .delta import SparseDeltaLayer, linear_shape, validate_indices
from .inject import default_modules_to_save, find_target_modules, unwrap_modules, wrap_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
HEAD_PREFIX = "modules_to_save."
FOLDED_PARTS = ("folded_indices", "folded_values")



def _sorted_membership(haystack: torch.Tensor, needles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(is each needle in ``haystack``, its position there where it is) for sorted, unique
    index sets: a binary search each, where ``torch.isin`` would sort both again."""
    pos = torch.searchsorted(haystack, needles)
    if haystack.numel() == 0:
        return torch.zeros_like(needles, dtype=torch.bool), pos
    found = haystack[pos.clamp_max(haystack.numel() - 1)] == needles
    return found, pos

class AdapterError(ValueError):
    """An adapter folder is missing, corrupt, or does not fit the base model."""


def base_fingerprint(model: nn.Module, target_names: list[str]) -> str:
    """Hash of the names and shapes of the targeted weights: two models with the same
    fingerprint accept the same adapter."""
    h = hashlib.sha256()
    for name in sorted(target_names):
        module = model.get_submodule(name)
        weight = module.base_layer.weight if isinstance(module, SparseDeltaLayer) else module.weight
        h.update(f"{name}:{tuple(weight.shape)};".encode())
    return h.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class SparseModel(nn.Module):
    """The wrapped model. Call it like the base model; train its ``values``."""

    def __init__(self, base_model: nn.Module, config: SparseConfig, target_names: list[str], modules_to_save: list[str]):
        super().__init__()
        self.base_model = base_model
        self.sparse_config = config
        self.target_names = list(target_names)
        self.modules_to_save = list(modules_to_save)
        self.fingerprint = base_fingerprint(base_model, self.target_names)
        # Show the base model's forward signature (transformers.Trainer inspects it to
        # decide which dataset columns to keep).
        forward = functools.partial(type(self).forward, self)
        forward.__signature__ = inspect.signature(base_model.forward)
        self.forward = forward

    # -- delegation ---------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    # -- parts --------------------------------------------------------------------
    def sparse_layers(self) -> dict[str, SparseDeltaLayer]:
        return {name: self.base_model.get_submodule(name) for name in self.target_names}

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [layer.values for layer in self.sparse_layers().values()]

    def dense_trainable_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that are not sparse values (task heads, biases)."""
        sparse_ids = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.base_model.parameters()
                if p.requires_grad and id(p) not in sparse_ids and not getattr(p, "_sparseft_ddp_anchor", False)]

    def target_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: linear_shape(layer.base_layer) for name, layer in self.sparse_layers().items()}

    # -- index sets ---------------------------------------------------------------
    def set_index_sets(self, index_sets: Mapping[str, torch.Tensor], optimizer: Any = None,
                       drop_policy: str = "zero") -> dict[str, int]:
        """Give layers new index sets. Entries present before and after keep their values
        (and, with a ``SparseAdamW``, their optimizer state); new entries start at zero
        with fresh optimizer state. Dropped entries are discarded (``"zero"``) or folded
        into the base weight for good (``"merge"``, recorded and saved with the adapter).

        Returns how many entries each layer dropped.
        """
        if drop_policy not in ("zero", "merge"):
            raise ValueError(f"drop_policy must be 'zero' or 'merge', got {drop_policy!r}")
        layers = self.sparse_layers()
        dropped_counts = {}
        # transformers.Trainer hands callbacks accelerate's wrapper around the optimizer.
        while optimizer is not None and not hasattr(optimizer, "remap_entries") and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        for name, new_idx in index_sets.items():
            layer = layers[name]
            new_idx = validate_indices(new_idx, layer.weight.numel()).to(layer.indices.device)
            old_idx = layer.indices
            kept, old_pos = _sorted_membership(old_idx, new_idx)
            new_pos = torch.nonzero(kept).flatten()
            old_pos = old_pos[kept]
            values = torch.zeros(new_idx.numel(), dtype=layer.values.dtype, device=new_idx.device)
            values[new_pos] = layer.values.detach()[old_pos]
            dropped = ~_sorted_membership(new_idx, old_idx)[0]
            dropped_counts[name] = int(dropped.sum())
            if (optimizer is not None and not hasattr(optimizer, "remap_entries")
                    and optimizer.state.get(layer.values) and not torch.equal(new_idx, old_idx)):
                raise RuntimeError(
                    "changing index sets during training needs per-entry optimizer state: "
                    "use sparseft.create_optimizer (SparseAdamW)"
                )
            if drop_policy == "merge" and dropped_counts[name]:
                layer.fold_into_base(old_idx[dropped], layer.values.detach()[dropped])
            layer.set_indices(new_idx, values)
            if optimizer is not None and hasattr(optimizer, "remap_entries"):
                optimizer.remap_entries(layer.values, old_pos, new_pos)
        return dropped_counts

    def num_folded_params(self) -> int:
        """Entries a dynamic schedule dropped and folded into the base weights."""
        return sum(layer.num_folded for layer in self.sparse_layers().values())

    # -- counting -----------------------------------------------------------------
    def num_sparse_params(self) -> int:
        return sum(layer.num_entries for layer in self.sparse_layers().values())

    def num_head_params(self) -> int:
        return sum(p.numel() for p in self.dense_trainable_parameters())

    def num_targeted_weights(self) -> int:
        return sum(layer.weight.numel() for layer in self.sparse_layers().values())

    def trainable_summary(self) -> dict[str, Any]:
        total = sum(p.numel() for p in self.base_model.parameters())
        sparse = self.num_sparse_params()
        dense = self.num_head_params()
        return {
            "sparse_params": sparse,
            "head_params": dense,
            "all_params": total,
            "targeted_weights": self.num_targeted_weights(),
            "density": sparse / max(self.num_targeted_weights(), 1),
            "target_modules": len(self.target_names),
        }

    def print_trainable_parameters(self) -> None:
        s = self.trainable_summary()
        print(
            f"sparse entries: {s['sparse_params']:,} ({100 * s['density']:.4f}% of {s['targeted_weights']:,} targeted weights"
            f" in {s['target_modules']} modules) || dense head/bias params: {s['head_params']:,}"
            f" || all params: {s['all_params']:,}"
            f" || trainable%: {100 * (s['sparse_params'] + s['head_params']) / s['all_params']:.4f}"
        )

    # -- merge --------------------------------------------------------------------
    def merge(self) -> None:
        for layer in self.sparse_layers().values():
            layer.merge()

    def unmerge(self) -> None:
        """Restore the base weights exactly after ``merge``."""
        for layer in self.sparse_layers().values():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Write the deltas into the base weights and return the plain base model."""
        model = unwrap_modules(self.base_model, merge=True)
        self.target_names = []
        return model

    def unload(self) -> nn.Module:
        """Return the base model with its original weights (deltas discarded)."""
        model = unwrap_modules(self.base_model, merge=False)
        self.target_names = []
        return model

    # -- save / load --------------------------------------------------------------
    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, layer in self.sparse_layers().items():
            tensors[f"{name}.indices"] = layer.indices.detach().to("cpu", torch.int32).contiguous()
            tensors[f"{name}.values"] = layer.values.detach().cpu().contiguous()
            if layer.num_folded:
                tensors[f"{name}.folded_indices"] = layer.folded_indices.detach().to("cpu", torch.int32).contiguous()
                tensors[f"{name}.folded_values"] = layer.folded_values.detach().cpu().contiguous()
        from .distributed import full_tensor

        for head in self.modules_to_save:
            for pname, p in self.base_model.get_submodule(head).state_dict().items():
                # An FSDP2-sharded head is gathered (a collective: every rank gets here).
                tensors[f"{HEAD_PREFIX}{head}.{pname}"] = full_tensor(p.detach()).cpu().contiguous()
        return tensors

    def adapter_metadata(self) -> dict[str, Any]:
        base_cfg = getattr(self.base_model, "config", None)
        return {
            "format_version": FORMAT_VERSION,
            "sparseft_version": __version__,
            "base_model": {
                "model_type": getattr(base_cfg, "model_type", None),
                "architectures": getattr(base_cfg, "architectures", None),
                "name_or_path": getattr(base_cfg, "_name_or_path", None),
                "num_labels": getattr(base_cfg, "num_labels", None),
                "fingerprint": self.fingerprint,
            },
            "targets": {name: list(layer.weight.shape) for name, layer in self.sparse_layers().items()},
            "modules_to_save": self.modules_to_save,
        }

    def save_pretrained(self, path: str | os.PathLike, extra_metadata: dict[str, Any] | None = None) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (atomically).

        Under torch.distributed only the main process (rank 0) writes: the values and
        index sets are the same on every rank (``sparseft.distributed``). Under DDP no
        collective is involved, so calling it on rank 0 alone is fine; with FSDP2-sharded
        task heads every rank must call it (the heads are gathered first).
        """
        from .distributed import is_main_process

        out = Path(path)
        tensors = self.adapter_tensors()
        if not is_main_process():
            return out
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        meta = {"sparse_config": self.sparse_config.to_dict(), **self.adapter_metadata(), **(extra_metadata or {}),
                "weights_sha256": file_sha256(out / WEIGHTS_NAME)}
        _atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"))
        return out

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path: str | os.PathLike, force: bool = False) -> "SparseModel":
        """Rebuild the sparse model saved at ``path`` on top of ``base_model``.

        Checks every index and shape; refuses an adapter made for other weights unless
        ``force`` (then only shapes must fit).
        """
        meta, tensors = read_adapter(path)
        config = SparseConfig.from_dict(meta["sparse_config"])
        targets = meta["targets"]
        heads = meta.get("modules_to_save", [])
        _check_fits(base_model, targets, heads)
        targets = {n: targets[n] for n, _ in base_model.named_modules() if n in targets}  # model order, not JSON's sorted order
        recorded, found = meta["base_model"].get("fingerprint"), base_fingerprint(base_model, list(targets))
        if recorded != found and not force:
            raise AdapterError(
                f"adapter was made for a base model with fingerprint {recorded}, this one has {found}; "
                "pass force=True (--force) to load it anyway"
            )
        for p in base_model.parameters():
            p.requires_grad_(False)
        wrap_modules(base_model, list(targets), backend=config.backend)
        model = cls(base_model, config, list(targets), heads)
        _load_tensors(model, tensors)
        if config.train_bias:
            for layer in model.sparse_layers().values():
                if layer.bias is not None:
                    layer.bias.requires_grad_(True)
        return model


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and structurally validate an adapter folder (safetensors only, no pickle)."""
    folder = Path(path)
    cfg_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for f in (cfg_path, weights_path):
        if not f.is_file():
            raise AdapterError(f"no adapter at {folder}: {f.name} is missing")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{cfg_path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or "sparse_config" not in meta or "targets" not in meta or "base_model" not in meta:
        raise AdapterError(f"{cfg_path} lacks sparse_config/targets/base_model: not a sparseft adapter")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{cfg_path} has format_version {meta.get('format_version')!r}; this sparseft reads {FORMAT_VERSION}")
    targets = meta["targets"]
    if not isinstance(targets, dict) or not all(
        isinstance(s, list) and len(s) == 2 and all(isinstance(d, int) and d > 0 for d in s) for s in targets.values()
    ):
        raise AdapterError(f"{cfg_path}: 'targets' must map module names to [rows, cols]")
    heads = meta.get("modules_to_save", [])
    if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads):
        raise AdapterError(f"{cfg_path}: 'modules_to_save' must be a list of module names")
    try:
        SparseConfig.from_dict(meta["sparse_config"])
    except ConfigError as err:
        raise AdapterError(f"{cfg_path}: {err}") from None
    recorded = meta.get("weights_sha256")
    if not isinstance(recorded, str):
        raise AdapterError(f"{cfg_path} lacks weights_sha256: not a complete sparseft adapter")
    if file_sha256(weights_path) != recorded:
        raise AdapterError(f"{weights_path} does not match the checksum in {CONFIG_NAME}: "
                           "the file is corrupt, or the two files come from different saves")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterError(f"{weights_path} is not a readable safetensors file: {err}") from None
    _check_tensors(targets, heads, tensors, weights_path)
    return meta, tensors


def _check_tensors(targets: dict, heads: list[str], tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = {f"{n}.{part}" for n in targets for part in ("indices", "values")}
    # Optional, in pairs: entries a dynamic schedule folded into the base weight.
    folded = {n for n in targets if f"{n}.folded_indices" in tensors or f"{n}.folded_values" in tensors}
    expected |= {f"{n}.{part}" for n in folded for part in FOLDED_PARTS}
    missing = sorted(expected - tensors.keys())
    extra = sorted(k for k in tensors.keys() - expected if not any(k.startswith(f"{HEAD_PREFIX}{h}.") for h in heads))
    if missing or extra:
        raise AdapterError(f"{where}: tensors do not match adapter_config.json (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, (rows, cols) in targets.items():
        idx, vals = tensors[f"{name}.indices"], tensors[f"{name}.values"]
        if idx.dtype != torch.int32:
            raise AdapterError(f"{where}: {name}.indices must be int32, found {idx.dtype}")
        if not vals.is_floating_point():
            raise AdapterError(f"{where}: {name}.values must be floating point, found {vals.dtype}")
        if idx.dim() != 1 or vals.dim() != 1 or idx.numel() != vals.numel():
            raise AdapterError(f"{where}: {name} has {idx.numel()} indices but {vals.numel()} values")
        try:
            validate_indices(idx, rows * cols)
        except ValueError as err:
            raise AdapterError(f"{where}: {name}.indices: {err}") from None
        if not bool(torch.isfinite(vals).all()):
            raise AdapterError(f"{where}: {name}.values holds NaN or infinity")
        if name in folded:
            fidx, fvals = tensors[f"{name}.folded_indices"], tensors[f"{name}.folded_values"]
            if fidx.dtype != torch.int32 or not fvals.is_floating_point() or fidx.dim() != 1 or fidx.shape != fvals.shape:
                raise AdapterError(f"{where}: {name}.folded_indices/folded_values must be int32 and float vectors of one length")
            try:
                validate_indices(fidx, rows * cols)
            except ValueError as err:
                raise AdapterError(f"{where}: {name}.folded_indices: {err}") from None
            if not bool(torch.isfinite(fvals).all()):
                raise AdapterError(f"{where}: {name}.folded_values holds NaN or infinity")


def _check_fits(model: nn.Module, targets: dict, heads: list[str]) -> None:
    for name, shape in targets.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"the base model has no module {name!r} that the adapter targets") from None
        weight = getattr(module, "weight", None)
        if weight is None or list(weight.shape) != list(shape):
            found = None if weight is None else list(weight.shape)
            raise AdapterError(f"module {name!r}: adapter expects a weight of shape {shape}, base model has {found}")
    for head in heads:
        try:
            model.get_submodule(head)
        except AttributeError:
            raise AdapterError(f"the base model has no task head {head!r} that the adapter saved") from None


def _load_tensors(model: SparseModel, tensors: dict[str, torch.Tensor]) -> None:
    for name, layer in model.sparse_layers().items():
        values = tensors[f"{name}.values"].to(layer.values.dtype)
        layer.set_indices(tensors[f"{name}.indices"], values)
        if f"{name}.folded_indices" in tensors:
            layer.set_folded(tensors[f"{name}.folded_indices"], tensors[f"{name}.folded_values"])
    for head in model.modules_to_save:
        module = model.base_model.get_submodule(head)
        prefix = f"{HEAD_PREFIX}{head}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise AdapterError(f"task head {head!r} does not fit the saved one: {err}") from None
        for p in module.parameters():
            p.requires_grad_(True)


def get_sparse_model(base_model: nn.Module, config: SparseConfig, calibration_data: Any = None) -> SparseModel:
    """Wrap the targeted layers of ``base_model`` and choose their index sets.

    The values start at zero, so the outputs equal the base model's exactly.
    """
    from .methods import get_method  # methods build on this module

    if isinstance(base_model, SparseModel):
        raise ConfigError("the model already carries sparse deltas")
    heads = config.modules_to_save or default_modules_to_save(base_model)
    targets = find_target_modules(base_model, config.target_modules, config.exclude_modules, heads)
    for p in base_model.parameters():
        p.requires_grad_(False)
    wrap_modules(base_model, targets, backend=config.backend)
    for head in heads:
        for p in base_model.get_submodule(head).parameters():
            p.requires_grad_(True)
    model = SparseModel(base_model, config, targets, heads)
    if config.train_bias:
        for layer in model.sparse_layers().values():
            if layer.bias is not None:
                layer.bias.requires_grad_(True)
    method = get_method(config)
    method.init(model, calibration_data)
    model.method = method
    return model
