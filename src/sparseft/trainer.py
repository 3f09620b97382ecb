"""``SparseTrainer``: a ``transformers.Trainer`` that knows a SparseModel.

It sets what a SparseModel needs on its own: ``SparseAdamW`` (per-entry optimizer state, so
methods can move entries) and ``SparseCallback`` (hands each step to the method). Its
checkpoints hold the adapter (indices, values, task heads), the method's full state and
the optimizer, never the dense model; ``save_model()`` writes the adapter; and
``train(resume_from_checkpoint=...)`` continues bit for bit for every method, index sets
that changed size included (they are restored through ``set_indices``).
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .callback import SparseCallback
from .model import AdapterError, SparseModel, _load_tensors, read_adapter
from .optim import SparseAdamW
from .quant import quiet_bitsandbytes_import
from .train import create_optimizer

with quiet_bitsandbytes_import():  # transformers.Trainer imports peft, which imports bitsandbytes
    from transformers import Trainer
    from transformers.utils import can_return_loss, find_labels

METHOD_STATE_JSON = "sparseft_method_state.json"
METHOD_STATE_TENSORS = "sparseft_method_state.safetensors"
TRAINING_ARGS_NAME = "training_args.bin"


class SparseTrainerMixin:
    """What makes a ``transformers.Trainer`` subclass train a ``SparseModel``; put it first
    in the bases of any Trainer subclass (``class SparseSFT(SparseTrainerMixin,
    trl.SFTTrainer)``). ``SparseTrainer`` is this mixin on ``transformers.Trainer``.

    Unless ``optimizers=`` is given, the optimizer is ``SparseAdamW`` over the sparse
    values (with ``args.weight_decay``) and the dense task heads/biases (without), at
    ``args.learning_rate`` with the Trainer's Adam betas and epsilon. A ``SparseCallback``
    is added to the callbacks (built before the Trainer wraps the model, as
    multi-process training needs).
    """

    def __init__(self, model: SparseModel, *args: Any, callbacks: list | None = None, **kwargs: Any):
        if not isinstance(model, SparseModel):
            raise TypeError(f"SparseTrainer trains a sparseft.SparseModel, got {type(model).__name__}")
        self.sparse_callback = next((c for c in callbacks or [] if isinstance(c, SparseCallback)), None)
        if self.sparse_callback is None:
            self.sparse_callback = SparseCallback(model)
            callbacks = [*(callbacks or []), self.sparse_callback]
        self._saving_checkpoint = False
        forward = model.__dict__.get("forward")
        super().__init__(model, *args, callbacks=callbacks, **kwargs)
        _move_fused_lm_head(model, forward)
        # The Trainer reads label names and loss support off the model's class; a
        # SparseModel's forward is the base model's.
        base_cls = type(model.get_base_model())
        if self.args.label_names is None:
            self.label_names = find_labels(base_cls)
        self.can_return_loss = can_return_loss(base_cls)

    @property
    def sparse_model(self) -> SparseModel:
        return self.model

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            args = self.args
            self.optimizer = create_optimizer(self.sparse_model, args.learning_rate, args.weight_decay)
            for group in self.optimizer.param_groups:
                group["betas"], group["eps"] = (args.adam_beta1, args.adam_beta2), args.adam_epsilon
        elif not isinstance(self.optimizer, SparseAdamW) and _moves_entries(self.sparse_model):
            raise ValueError(f"the {self.sparse_model.method.name} method moves entries during training and needs "
                             "SparseAdamW's per-entry state: leave optimizers= unset")
        return self.optimizer

    # -- saving -----------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self._saving_checkpoint = _internal_call
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._saving_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter (sparseft's two files), in a checkpoint also the method's full
        state; the tokenizer and training arguments as the Trainer saves them."""
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.sparse_model.save_pretrained(out)
        if self._saving_checkpoint:
            save_method_state(self.sparse_model, out)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(out)
        torch.save(self.args, out / TRAINING_ARGS_NAME)

    # -- loading ------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        load_adapter_checkpoint(self.sparse_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapter_checkpoint(self.sparse_model, self.state.best_model_checkpoint, method_state=False)


class SparseTrainer(SparseTrainerMixin, Trainer):
    """``transformers.Trainer`` for a ``SparseModel``; takes the Trainer's arguments (see
    ``SparseTrainerMixin`` for what it sets itself)."""


def _move_fused_lm_head(model: SparseModel, forward: Any) -> None:
    """trl's ``SFTTrainer`` replaces the forward of the model it is given by one with a
    fused LM head, which reads the transformers backbone (``base_model``) off that model.
    On a SparseModel (which does not offer ``base_model``) the patch is undone and made
    again on the wrapped transformers model, as trl does for a peft model; the SparseModel's
    forward passes ``fused_lm_head=True`` through to it."""
    patched = model.__dict__.get("forward")
    code = getattr(getattr(patched, "__func__", None), "__code__", None)
    if patched is forward or code is None or "fused_lm_head" not in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]:
        return
    from trl.trainer.utils import add_fused_lm_head

    # the settings trl patched with, read back from the patch's closure
    cells = dict(zip(patched.__func__.__code__.co_freevars, patched.__func__.__closure__ or ()))
    settings = {k: cells[k].cell_contents for k in inspect.signature(add_fused_lm_head).parameters
                if k != "model" and k in cells}
    model.forward = forward
    add_fused_lm_head(model.get_base_model(), **settings)


def _moves_entries(model: SparseModel) -> bool:
    method = getattr(model, "method", None)
    return method is not None and method.name != "static"


def save_method_state(model: SparseModel, folder: Path) -> None:
    """The method's whole state (partial gradient sums of a scoring window included)."""
    from .checkpoint import _split_tensors

    method = getattr(model, "method", None)
    tensors: dict[str, torch.Tensor] = {}
    state = _split_tensors(method.state_dict(), tensors) if method is not None else None
    save_file(tensors, str(folder / METHOD_STATE_TENSORS))
    (folder / METHOD_STATE_JSON).write_text(json.dumps({"method": getattr(method, "name", None), "state": state}))


def load_adapter_checkpoint(model: SparseModel, folder: str | os.PathLike, method_state: bool = True) -> None:
    """Put a checkpoint's adapter (and the method's state) into ``model``: index sets
    of any size, folded entries replayed onto the pristine base weights, task heads."""
    from .checkpoint import _join_tensors

    folder = Path(folder)
    try:
        meta, tensors = read_adapter(folder)
    except AdapterError as err:
        raise AdapterError(f"checkpoint {folder} holds no readable sparseft adapter: {err}") from None
    layers = model.sparse_layers()
    if set(meta["targets"]) != set(layers):
        raise AdapterError(f"checkpoint {folder} targets other modules than this model")
    for layer in layers.values():
        layer.restore_base()
    _load_tensors(model, tensors)
    method = getattr(model, "method", None)
    if not method_state or method is None:
        return
    if not (folder / METHOD_STATE_JSON).is_file():
        if method.name != "static":
            raise AdapterError(f"checkpoint {folder} lacks {METHOD_STATE_JSON}: the {method.name} method cannot "
                               "resume without its state")
        return
    record = json.loads((folder / METHOD_STATE_JSON).read_text())
    if record["method"] != method.name:
        raise AdapterError(f"checkpoint {folder} was written by the {record['method']} method, "
                           f"this model runs {method.name}")
    method.load_state_dict(_join_tensors(record["state"], load_file(str(folder / METHOD_STATE_TENSORS))))
