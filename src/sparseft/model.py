"""SparseModel: a base model whose targeted weights carry sparse deltas."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._version import __version__
from .config import DENSE_BASE_METHODS, ConfigError, SparseConfig, dense_base_refusal
from .delta import SparseDeltaLayer, linear_shape, validate_indices, weight_shape
from .inject import _parent_and_child, default_modules_to_save, find_target_modules, unwrap_modules, wrap_modules
from .quant import is_quantized, quantize_modules

# sparseft's own file names: a folder holding them is neither a PEFT adapter
# (adapter_config.json) nor a transformers model (config.json), so neither library mistakes
# it for one of its own. Older sparseft adapters used PEFT's names; they are still read.
CONFIG_NAME = "sparseft_config.json"
WEIGHTS_NAME = "sparseft_delta.safetensors"
LEGACY_CONFIG_NAME = "adapter_config.json"
LEGACY_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
DEFAULT_ADAPTER = "default"
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
        shape = module.weight_shape if isinstance(module, SparseDeltaLayer) else weight_shape(module)
        h.update(f"{name}:{tuple(shape)};".encode())
    return h.hexdigest()[:16]


WEIGHT_SAMPLES = 4096  # entries hashed per targeted matrix by weights_fingerprint


def weights_fingerprint(model: nn.Module, target_names: list[str]) -> str:
    """Hash of the targeted weights' values: per matrix, its name, its shape and
    ``WEIGHT_SAMPLES`` entries at evenly spaced flat positions (all of a smaller one),
    rounded to bfloat16 so that an fp32 and a bf16 copy of one checkpoint agree.
    Cheap (a few thousand reads per matrix) and enough to tell other weights apart."""
    h = hashlib.sha256()
    for name in sorted(target_names):
        module = model.get_submodule(name)
        weight = module.base_layer.weight if isinstance(module, SparseDeltaLayer) else module.weight
        flat = weight.detach().reshape(-1)
        positions = torch.linspace(0, flat.numel() - 1, min(flat.numel(), WEIGHT_SAMPLES)).round().long()
        sample = flat[positions.to(flat.device)].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(f"{name}:{tuple(weight.shape)};".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_mode() -> int:
    """The mode an ordinary new file gets here: 0666 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``.

    ``write(tmp)`` fills the temporary file; it ends with an ordinary file's mode
    (``file_mode``), not mkstemp's private 0600.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# Base-model attributes that ``SparseModel`` never forwards: anything that saves, uploads,
# loads or switches adapters on the base model would act on the wrong object (the whole
# base model, or transformers' own PEFT integration) without sparseft knowing.
_REFUSED_PREFIXES = ("save_", "push_to_hub", "upload", "_upload", "_create_repo", "from_pretrained")


def _refused(name: str) -> bool:
    return "adapter" in name or name.startswith(_REFUSED_PREFIXES)


class SparseModel(nn.Module):
    """The wrapped model. Call it like the base model; train its ``values``.

    Attributes that ``SparseModel`` does not define itself (``config``, ``generate``,
    ``device``, ``dtype``, ``gradient_checkpointing_enable``, ...) are read from the base
    model, except those that save, upload, load or switch adapters (``save_*``,
    ``push_to_hub*``, ``*adapter*``, ...): those raise ``AttributeError`` rather than act on
    the whole base model. sparseft's own ``save_pretrained``, ``push_to_hub``,
    ``load_adapter``, ``set_adapter``, ... are defined here.

    ``.model`` is the transformers model (``get_base_model()`` returns it). ``.base_model``
    is not offered: in peft it is the tuner wrapper and in transformers the backbone, and
    neither is what a SparseModel would return.

    Several named adapters can share one base (``load_adapter``, ``set_adapter``,
    ``add_weighted_adapter``); the active one lives in the wrapped layers, the others are
    kept as their saved tensors. They must target the same modules.
    """

    def __init__(self, base_model: nn.Module, config: SparseConfig, target_names: list[str], modules_to_save: list[str]):
        super().__init__()
        self.model = base_model
        self.sparse_config = config
        self.target_names = list(target_names)
        self.modules_to_save = list(modules_to_save)
        self.fingerprint = base_fingerprint(base_model, self.target_names)
        self.method = None
        self.active_adapter = DEFAULT_ADAPTER
        self._inactive: dict[str, dict[str, Any]] = {}  # name -> {"config", "tensors", "method", "heads"}
        self.weights_fingerprint = weights_fingerprint(base_model, self.target_names)  # before any fold or merge
        # Show the base model's forward signature (transformers.Trainer inspects it to
        # decide which dataset columns to keep).
        forward = functools.partial(type(self).forward, self)
        forward.__signature__ = inspect.signature(base_model.forward)
        self.forward = forward

    # -- delegation ---------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or name.startswith("__"):
                raise
        if name == "base_model":
            raise AttributeError(
                "SparseModel.base_model is not offered (in peft it is the tuner wrapper, in transformers the "
                "backbone): use get_base_model() or .model for the wrapped transformers model")
        if _refused(name):
            raise AttributeError(
                f"SparseModel does not forward {name!r} to the base model: it would save, upload or switch "
                "adapters of the whole base model. Use SparseModel's own save_pretrained / push_to_hub / "
                "load_adapter / set_adapter, or get_base_model() to reach the base model on purpose."
            )
        return getattr(self.model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (its targeted layers carry the sparse deltas)."""
        return self.model

    # -- parts --------------------------------------------------------------------
    def sparse_layers(self) -> dict[str, SparseDeltaLayer]:
        return {name: self.model.get_submodule(name) for name in self.target_names}

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [layer.values for layer in self.sparse_layers().values()]

    def dense_trainable_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that are not sparse values (task heads, biases)."""
        sparse_ids = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.model.parameters()
                if p.requires_grad and id(p) not in sparse_ids and not getattr(p, "_sparseft_ddp_anchor", False)]

    def target_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: linear_shape(layer.base_layer) for name, layer in self.sparse_layers().items()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, also for index sets of another size than the
        current ones (an ID3 or dynamic run saved mid-training): each layer's
        ``indices`` and ``values`` go in through ``set_indices`` first."""
        state = dict(state_dict)
        for name, layer in self.sparse_layers().items():
            idx_key, val_key = f"model.{name}.indices", f"model.{name}.values"
            if idx_key in state and val_key in state and state[idx_key].shape != layer.indices.shape:
                layer.set_indices(state[idx_key].to(torch.int32), state[val_key].to(layer.values.dtype))
        return super().load_state_dict(state, strict=strict, assign=assign)

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
            new_idx = validate_indices(new_idx, layer.weight_numel).to(layer.indices.device)
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
        return sum(layer.weight_numel for layer in self.sparse_layers().values())

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counted as peft counts them: every
        element of every parameter, the sparse values included in both."""
        params = [p for p in self.parameters() if not getattr(p, "_sparseft_ddp_anchor", False)]
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def trainable_summary(self) -> dict[str, Any]:
        total = sum(p.numel() for p in self.model.parameters())
        for layer in self.sparse_layers().values():  # a quantized weight counts its float entries, not its bytes
            packed = getattr(layer, "quantized_base", None)
            if packed is not None and not layer.merged:
                total += layer.weight_numel - packed.weight.numel()
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

    def merge_and_unload(self, requantize: bool = False) -> nn.Module:
        """Write the deltas into the base weights and return the plain base model.

        A quantized base layer becomes a plain float ``nn.Linear`` holding dequant(Wq) + S:
        exact, in full precision. ``requantize=True`` instead quantizes that merged weight
        back to the layer's format (the quantized model's memory, but rounding moves the
        weights): the error is measured per layer, kept in ``self.merge_report`` and warned
        about.
        """
        if requantize:
            from .delta.quantized import requantize_deltas

            self.merge_report = requantize_deltas(self.model)
        model = unwrap_modules(self.model, merge=True)
        self.target_names = []
        return model

    def unload(self) -> nn.Module:
        """Return the base model with its original weights (deltas discarded)."""
        model = unwrap_modules(self.model, merge=False)
        self.target_names = []
        return model

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator["SparseModel"]:
        """Inside the block the targeted layers compute with the base weights alone (the
        wrapped layers are swapped out, merged deltas and folded entries taken out of
        the weights); on exit everything is put back bit for bit. Task heads
        (``modules_to_save``) are trained in place, so they stay as they are."""
        layers = self.sparse_layers()
        merged = [name for name, layer in layers.items() if layer.merged]
        with torch.no_grad():
            for name, layer in layers.items():
                layer.unmerge()
                if layer.num_folded:
                    layer.weight.view(-1)[layer.folded_indices.long()] = layer._folded_base
                parent, child = _parent_and_child(self.model, name)
                setattr(parent, child, layer.base_layer)
        try:
            yield self
        finally:
            with torch.no_grad():
                for name, layer in layers.items():
                    parent, child = _parent_and_child(self.model, name)
                    setattr(parent, child, layer)
                    if layer.num_folded:  # the same expression that wrote them: the same bits
                        layer.weight.view(-1)[layer.folded_indices.long()] = layer._folded_base + layer.folded_values
                    if name in merged:
                        layer.merge()

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
            for pname, p in self.model.get_submodule(head).state_dict().items():
                # An FSDP2-sharded head is gathered (a collective: every rank gets here).
                tensors[f"{HEAD_PREFIX}{head}.{pname}"] = full_tensor(p.detach()).cpu().contiguous()
        return tensors

    def adapter_metadata(self) -> dict[str, Any]:
        base_cfg = getattr(self.model, "config", None)
        return {
            "format_version": FORMAT_VERSION,
            "sparseft_version": __version__,
            "base_model": {
                "model_type": getattr(base_cfg, "model_type", None),
                "architectures": getattr(base_cfg, "architectures", None),
                "name_or_path": getattr(base_cfg, "_name_or_path", None),
                "num_labels": getattr(base_cfg, "num_labels", None),
                "fingerprint": self.fingerprint,
                "weights_fingerprint": self.weights_fingerprint,
            },
            "targets": {name: list(layer.weight_shape) for name, layer in self.sparse_layers().items()},
            "modules_to_save": self.modules_to_save,
            "method": method_record(self.method),
        }

    def save_pretrained(self, path: str | os.PathLike, extra_metadata: dict[str, Any] | None = None) -> Path:
        """Write the active adapter as ``sparseft_config.json`` and
        ``sparseft_delta.safetensors`` (atomically).

        The config records the method and its progress (``method``: e.g. a dynamic
        schedule's update count, ID3's unmasking schedule), so that ``from_pretrained(...,
        is_trainable=True)`` continues with the same method.

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
        atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        meta = {"sparse_config": self.sparse_config.to_dict(), **self.adapter_metadata(), **(extra_metadata or {}),
                "weights_sha256": file_sha256(out / WEIGHTS_NAME)}
        atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"))
        return out

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload sparseft adapter", revision: str | None = None,
                    create_pr: bool = False) -> Any:
        """Upload the active adapter (its two files, nothing of the base model) to the
        Hugging Face Hub repository ``repo_id``, creating it if needed."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory(prefix="sparseft-push-") as tmp:
            self.save_pretrained(tmp)
            repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            return api.upload_folder(repo_id=getattr(repo, "repo_id", repo_id), folder_path=tmp, repo_type="model",
                                     commit_message=commit_message, revision=revision, create_pr=create_pr)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER,
                        is_trainable: bool = False, force: bool = False, strict: bool = False) -> "SparseModel":
        """Rebuild the sparse model saved at ``path`` on top of ``base_model``.

        As in peft, the result is in eval mode with frozen values and heads unless
        ``is_trainable``; then the method recorded with the adapter is restored (a
        dynamic schedule keeps moving its entries), and an adapter of a training-time
        method saved without that record is refused rather than trained as static.
        Checks every index and shape. Refuses an adapter whose targeted module names and
        shapes differ from ``base_model``'s unless ``force`` (then only the shapes of the
        targets must fit). Where the names and shapes agree but the weights' values do not
        (``weights_fingerprint``: another checkpoint of the same architecture), it warns,
        or refuses when ``strict``.
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
        recorded_weights = meta["base_model"].get("weights_fingerprint")
        if recorded_weights is not None and not force:
            found_weights = weights_fingerprint(base_model, list(targets))
            if found_weights != recorded_weights:
                message = (f"adapter {path} was trained on other base weights than these (weights fingerprint "
                           f"{recorded_weights}, this model has {found_weights}): same module names and shapes, "
                           "other values, so its results will not carry over")
                if strict:
                    raise AdapterError(message + "; strict loading refuses it")
                warnings.warn(message, stacklevel=2)
        method = restore_method(config, meta, is_trainable, path)
        prepare_quantized_base(base_model, list(targets), config)
        for p in base_model.parameters():
            p.requires_grad_(False)
        wrap_modules(base_model, list(targets), backend=config.backend)
        model = cls(base_model, config, list(targets), heads)
        model.active_adapter = adapter_name
        _load_tensors(model, tensors)
        model.method = method
        model._set_trainable(is_trainable)
        if not is_trainable:
            model.eval()
        return model

    def _set_trainable(self, trainable: bool) -> None:
        for layer in self.sparse_layers().values():
            layer.values.requires_grad_(trainable)
            if layer.bias is not None and self.sparse_config.train_bias:
                layer.bias.requires_grad_(trainable)
        for head in self.modules_to_save:
            self.model.get_submodule(head).requires_grad_(trainable)

    # -- named adapters -------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """The active adapter first, then the others in the order they were added."""
        return [self.active_adapter, *self._inactive]

    def _snapshot(self) -> dict[str, Any]:
        # Copies: on CPU the tensors would share storage with the live values and heads.
        tensors = {k: v.clone() for k, v in self.adapter_tensors().items()}
        return {"config": self.sparse_config, "tensors": tensors, "method": self.method}

    def _adapter(self, name: str) -> dict[str, Any]:
        if name == self.active_adapter:
            return self._snapshot()
        if name not in self._inactive:
            raise ValueError(f"no adapter named {name!r}; this model holds {', '.join(self.adapter_names)}")
        return self._inactive[name]

    def load_adapter(self, path: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     force: bool = False) -> None:
        """Read the adapter at ``path`` as ``adapter_name`` (not activated: see ``set_adapter``).
        It must target the same modules (and heads) as this model's adapters."""
        if adapter_name in self.adapter_names:
            raise ValueError(f"an adapter named {adapter_name!r} is already loaded")
        meta, tensors = read_adapter(path)
        shapes = {n: list(s) for n, s in self.target_shapes().items()}
        if meta["targets"] != shapes or meta.get("modules_to_save", []) != self.modules_to_save:
            raise AdapterError(f"adapter {path} targets other modules or heads than this model's adapters; "
                               "adapters on one base must target the same modules")
        if meta["base_model"].get("fingerprint") != self.fingerprint and not force:
            raise AdapterError(f"adapter {path} was made for a base model with fingerprint "
                               f"{meta['base_model'].get('fingerprint')}, this one has {self.fingerprint}; pass force=True")
        config = SparseConfig.from_dict(meta["sparse_config"])
        self._inactive[adapter_name] = {"config": config, "tensors": tensors,
                                        "method": restore_method(config, meta, is_trainable, path)}

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter: its entries, folded entries, task heads,
        config and method move into the model; the previously active one is kept aside."""
        if adapter_name == self.active_adapter:
            return
        target = self._adapter(adapter_name)
        layers = self.sparse_layers()
        if any(layer.merged for layer in layers.values()):
            raise RuntimeError("unmerge the active adapter before switching adapters")
        trainable = any(p.requires_grad for p in self.sparse_parameters())
        current = self._snapshot()
        for layer in layers.values():
            layer.restore_base()
        _load_tensors(self, target["tensors"])
        self._set_trainable(trainable)
        self.sparse_config, self.method = target["config"], target["method"]
        del self._inactive[adapter_name]
        self._inactive[self.active_adapter] = current
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Forget ``adapter_name``; deleting the active adapter activates the next one."""
        self._adapter(adapter_name)
        if adapter_name == self.active_adapter:
            if not self._inactive:
                raise ValueError(f"{adapter_name!r} is the only adapter: there is nothing to switch to")
            self.set_adapter(next(iter(self._inactive)))
        del self._inactive[adapter_name]

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Add ``adapter_name`` = sum_i weights[i] * adapters[i], exactly: on each layer its
        entries are the union of the adapters' entries (folded ones included) and its
        values the weighted sums. Not activated (see ``set_adapter``). Task heads are not
        summed: the adapters must carry identical heads, which the new one keeps."""
        if adapter_name in self.adapter_names:
            raise ValueError(f"an adapter named {adapter_name!r} is already loaded")
        if not adapters or len(adapters) != len(weights):
            raise ValueError("give one weight per adapter, and at least one adapter")
        snaps = [self._adapter(name) for name in adapters]
        tensors = {}
        for name, layer in self.sparse_layers().items():
            parts = [(s["tensors"][f"{name}.{i}"].long(), s["tensors"][f"{name}.{v}"], w)
                     for s, w in zip(snaps, weights)
                     for i, v in (("indices", "values"), ("folded_indices", "folded_values"))
                     if f"{name}.{i}" in s["tensors"]]
            union = torch.unique(torch.cat([idx for idx, _, _ in parts]))  # sorted
            total = torch.zeros(union.numel(), dtype=torch.float64)
            for idx, values, w in parts:
                total.index_add_(0, torch.searchsorted(union, idx), values.double() * float(w))
            tensors[f"{name}.indices"] = union.to(torch.int32)
            tensors[f"{name}.values"] = total.to(layer.values.dtype)
        heads = [{k: v for k, v in s["tensors"].items() if k.startswith(HEAD_PREFIX)} for s in snaps]
        if any(h.keys() != heads[0].keys() or not all(torch.equal(h[k], heads[0][k]) for k in h) for h in heads[1:]):
            raise ValueError("the adapters carry different task heads (modules_to_save); a weighted sum of heads "
                             "is not defined")
        tensors.update(heads[0])
        self._inactive[adapter_name] = {"config": dataclasses.replace(snaps[0]["config"]), "tensors": tensors,
                                        "method": None}


def method_record(method: Any) -> dict[str, Any] | None:
    """The method's name and its JSON-able state, kept with the adapter. Tensors (a scoring
    window's partial gradient sums, as large as the weights) stay out: they belong to
    training checkpoints, so a continued run starts a fresh scoring window."""
    if method is None:
        return None

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items() if not _holds_tensor(v)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {"name": method.name, "state": plain(method.state_dict())}


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    return False


def restore_method(config: SparseConfig, meta: dict[str, Any], is_trainable: bool, where: Any) -> Any:
    """The method object of a saved adapter, its recorded state restored; None for an
    adapter saved without a method record (older sparseft) that is not to be trained.
    Training such an adapter further is refused when its method changes index sets
    during training (it would silently train as a static one)."""
    from .methods import get_method  # methods build on this module

    method = get_method(config)
    record = meta.get("method")
    if record is None:
        if is_trainable and method.name != "static":
            raise AdapterError(
                f"adapter {where} was trained with the {method.name} method but saved without its state "
                "(an older sparseft): it cannot be continued as that method. Load it with is_trainable=False, "
                "or resume the run from a training checkpoint")
        return None if not is_trainable else method
    if not isinstance(record, dict) or record.get("name") != method.name or not isinstance(record.get("state"), dict):
        raise AdapterError(f"adapter {where}: its method record does not match its config (method {method.name})")
    method.load_state_dict(record["state"])
    return method


def adapter_files(folder: Path) -> tuple[Path, Path]:
    """The config and weights files of the adapter in ``folder``: sparseft's own names,
    or the PEFT-like names that older sparseft versions wrote."""
    if not (folder / CONFIG_NAME).exists() and (folder / LEGACY_CONFIG_NAME).is_file():
        try:
            legacy = "sparse_config" in json.loads((folder / LEGACY_CONFIG_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            legacy = False
        if legacy:
            return folder / LEGACY_CONFIG_NAME, folder / LEGACY_WEIGHTS_NAME
    return folder / CONFIG_NAME, folder / WEIGHTS_NAME


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and structurally validate an adapter folder (safetensors only, no pickle)."""
    folder = Path(path)
    cfg_path, weights_path = adapter_files(folder)
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
        raise AdapterError(f"{weights_path} does not match the checksum in {cfg_path.name}: "
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
        raise AdapterError(f"{where}: tensors do not match the adapter's config (missing {missing[:3]}, unexpected {extra[:3]})")
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
        found = None if getattr(module, "weight", None) is None else list(weight_shape(module))
        if found != list(shape):
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
        module = model.model.get_submodule(head)
        prefix = f"{HEAD_PREFIX}{head}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise AdapterError(f"task head {head!r} does not fit the saved one: {err}") from None
        for p in module.parameters():
            p.requires_grad_(True)


def prepare_quantized_base(base_model: nn.Module, targets: list[str], config: SparseConfig) -> None:
    """Quantize the targeted layers when ``config.quantize`` asks (layers quantized already
    in that format are kept); refuse methods that need a float base on a quantized one."""
    if config.quantize is not None:
        quantize_modules(base_model, targets, config.quantize)
    if config.method in DENSE_BASE_METHODS and any(is_quantized(base_model.get_submodule(n)) for n in targets):
        raise ConfigError(dense_base_refusal(config.method))


def get_sparse_model(base_model: nn.Module, config: SparseConfig, calibration_data: Any = None) -> SparseModel:
    """Wrap the targeted layers of ``base_model`` and choose their index sets.

    The values start at zero, so the outputs equal the base model's exactly.
    """
    from .methods import get_method  # methods build on this module

    if isinstance(base_model, SparseModel):
        raise ConfigError("the model already carries sparse deltas")
    heads = config.modules_to_save or default_modules_to_save(base_model)
    targets = find_target_modules(base_model, config.target_modules, config.exclude_modules, heads)
    prepare_quantized_base(base_model, targets, config)
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
