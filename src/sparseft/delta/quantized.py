"""The sparse delta on a quantized frozen base: y = x @ (dequant(Wq) + S)^T + b.

The float weight is rebuilt for each matmul (forward, and input gradient in backward)
into a fresh buffer, the delta is added there, and the buffer is dropped right after:
only the quantized weight stays alive between the passes. The values' gradient is the
same SDDMM as on a float base (it never reads W). Entries that a dynamic schedule folds
"into the base" are kept beside it as a float record and added at the same point,
because writing them into a 4-bit weight would round them away.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import quant
from .backends import _as_2d, sddmm
from .layer import SparseDeltaLayer
from .layout import validate_indices


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def effective_weight(base: nn.Module, dtype: torch.dtype, values: torch.Tensor, indices: torch.Tensor,
                     folded_indices: torch.Tensor, folded_values: torch.Tensor) -> torch.Tensor:
    """dequant(Wq) + folded + S in one fresh float buffer of ``dtype``."""
    w = quant.dequantize(base, dtype)
    flat = w.view(-1)
    if folded_indices.numel():
        flat.index_add_(0, folded_indices, folded_values.detach().to(dtype))
    if values.numel() == flat.numel():
        flat.add_(values.detach().to(dtype))  # a full index is 0..n-1
    elif values.numel():
        flat.index_add_(0, indices, values.detach().to(dtype))
    return w


class QuantizedDeltaFunction(torch.autograd.Function):
    """The sparse-delta linear with a quantized ``base`` (a bitsandbytes layer): same
    gradients as on a float base holding dequant(Wq). Under autocast the matmuls run in
    the autocast dtype (the weight is cast, as autocast casts an ``nn.Linear``'s), the
    values' gradient is accumulated in float32 and returned in the values' dtype."""

    @staticmethod
    def forward(ctx, x, bias, values, indices, folded_indices, folded_values, base, dtype, layout, backend,
                grad_observer):
        compute = _autocast_dtype(x.device.type)
        if compute is None and x.dtype != dtype:
            compute = x.dtype  # e.g. bf16 activations on a weight recorded as float32
        with torch.autocast(x.device.type, enabled=False):
            w = effective_weight(base, dtype, values, indices, folded_indices, folded_values)
            if compute is not None:
                x_c, w, b = x.to(compute), w.to(compute), None if bias is None else bias.to(compute)
            else:
                x_c, b = x, bias
            out = F.linear(x_c, w, b)
        del w
        ctx.save_for_backward(x_c, values, indices, folded_indices, folded_values)
        ctx.base, ctx.dtype, ctx.layout, ctx.backend = base, dtype, layout, backend
        ctx.grad_observer = grad_observer
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, values, indices, folded_indices, folded_values = ctx.saved_tensors
        needs_x, needs_bias, needs_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_x = grad_bias = grad_values = None
        g2 = _as_2d(grad_out)
        if g2.dtype != x.dtype:
            g2 = g2.to(x.dtype)
        with torch.autocast(g2.device.type, enabled=False):
            if needs_x:
                w = effective_weight(ctx.base, ctx.dtype, values, indices, folded_indices, folded_values)
                grad_x = g2.matmul(w.to(g2.dtype)).view(*x.shape[:-1], w.shape[1]).to(ctx.x_dtype)
                del w
            x2 = _as_2d(x)
            dense = g2.t().matmul(x2) if ctx.grad_observer is not None else None
            if needs_values:
                if dense is not None:
                    grad_values = dense.reshape(-1).index_select(0, indices).to(values.dtype)
                else:
                    rf, cf = (g2, x2) if g2.dtype == torch.float32 else (g2.float(), x2.float())
                    owner = x if cf is x2 else None
                    grad_values = sddmm(rf, cf, ctx.layout, ctx.backend, None, owner).to(values.dtype)
            if needs_bias and ctx.has_bias:
                grad_bias = g2.sum(0)
            if dense is not None:
                ctx.grad_observer(dense.float() if dense.dtype != torch.float32 else dense)
        return grad_x, grad_bias, grad_values, None, None, None, None, None, None, None, None


class QuantizedSparseDeltaLayer(SparseDeltaLayer):
    """A ``SparseDeltaLayer`` whose frozen base is a bitsandbytes 4-bit/8-bit ``Linear``.

    ``weight`` reads as dequant(Wq) (plus folded entries): a fresh float tensor on each
    access, so readers (|w| for scores) see what the forward uses, and writing into it
    changes nothing. ``merge`` swaps in a plain ``nn.Linear`` holding the exact merged
    float weight (a full-precision copy while merged); ``unmerge`` puts the quantized
    layer back untouched.
    """

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor | None = None, backend: str = "auto",
                 weight_mode: str = "auto"):
        self._quant_format = quant.quantized_format(base_layer)
        if self._quant_format is None:
            raise TypeError(f"{type(base_layer).__name__} is not a bitsandbytes quantized linear layer")
        super().__init__(base_layer, indices, backend, weight_mode)

    @property
    def quant_format(self) -> str:
        return self._quant_format

    @property
    def quantized_base(self) -> nn.Module:
        """The bitsandbytes layer (also while merged or in ``float_base``)."""
        stash = self.__dict__.get("_merged_original") or self.__dict__.get("_float_stash")  # unset in __init__
        return stash[0] if stash is not None else self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        if self.merged or self.__dict__.get("_float_stash") is not None:
            return self.base_layer.weight
        return self._dequantized_with_folds()

    def _float_linear(self, weight: torch.Tensor) -> nn.Linear:
        base = self.base_layer
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=base.bias is not None, device="meta")
        dense.weight = nn.Parameter(weight, requires_grad=False)
        if base.bias is not None:
            dense.bias = base.bias  # shared, so a trained bias stays the same parameter
        dense.train(base.training)
        return dense

    @contextlib.contextmanager
    def float_base(self) -> Iterator[None]:
        """Within the block the base is a plain float ``nn.Linear`` holding dequant(Wq) +
        folded (the delta stays a delta): for scorers that change the weights in place or
        need them as parameters (synflow). A full-precision copy while it lasts."""
        if self.merged or self.__dict__.get("_float_stash") is not None:
            raise RuntimeError("float_base needs an unmerged quantized layer")
        quantized = self.base_layer
        self.base_layer = self._float_linear(self._dequantized_with_folds())
        self._float_stash = (quantized,)
        try:
            yield
        finally:
            self.base_layer = quantized
            self._float_stash = None

    def _dequantized_with_folds(self) -> torch.Tensor:
        w = quant.dequantize(self.quantized_base, self.weight_dtype)
        if self.num_folded:
            w.view(-1).index_add_(0, self.folded_indices, self.folded_values.to(w.dtype))
        return w

    @property
    def weight_shape(self) -> tuple[int, int]:
        return quant.weight_shape(self.quantized_base)

    @property
    def weight_numel(self) -> int:
        rows, cols = self.weight_shape
        return rows * cols

    @property
    def weight_dtype(self) -> torch.dtype:
        return quant.weight_dtype(self.quantized_base)

    @property
    def weight_device(self) -> torch.device:
        return self.quantized_base.weight.device

    def _require_whole_weight(self, what: str) -> None:
        pass  # the quantized weight is never written to

    # -- folded entries: a float record beside the quantized weight ---------------------
    @torch.no_grad()
    def fold_into_base(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        if self.merged:
            raise RuntimeError("unmerge the delta before folding entries into the base weight")
        indices = validate_indices(indices, self.weight_numel).to(self.weight_device)
        if indices.numel() == 0:
            return
        values = values.detach().to(device=self.weight_device, dtype=self.weight_dtype)
        union = torch.unique(torch.cat([self.folded_indices, indices]).long()).to(torch.int32)
        folded = torch.zeros(union.numel(), dtype=self.weight_dtype, device=union.device)
        folded[torch.searchsorted(union, self.folded_indices)] = self.folded_values
        folded[torch.searchsorted(union, indices)] += values
        self.folded_indices, self.folded_values = union, folded

    @torch.no_grad()
    def set_folded(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        if self.merged or self.num_folded:
            raise RuntimeError("set_folded needs a pristine, unmerged base weight")
        indices = validate_indices(indices, self.weight_numel).to(self.weight_device)
        if values.shape != indices.shape:
            raise ValueError(f"folded values has {values.numel()} entries for {indices.numel()} indices")
        self.folded_indices = indices
        self.folded_values = values.detach().to(device=self.weight_device, dtype=self.weight_dtype).clone()

    @torch.no_grad()
    def restore_base(self) -> None:
        if self.merged:
            raise RuntimeError("unmerge the delta before restoring the base weight")
        self.folded_indices, self.folded_values = self.folded_indices[:0], self.folded_values[:0]

    # -- compute ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.__dict__.get("_float_stash") is not None:
            return super().forward(x)
        # Never the bitsandbytes layer's own forward: on CPU, in eval mode without gradients,
        # it repacks the weight in place (scales rounded to bf16). With no entries the
        # function is a plain linear on dequant(W), and the empty values stay in the graph.
        out = QuantizedDeltaFunction.apply(
            x, self.base_layer.bias, self.values, self.indices, self.folded_indices, self.folded_values,
            self.base_layer, self.weight_dtype, self.layout, self.backend, self.grad_observer)
        if self.ddp_anchor is not None and torch.is_grad_enabled():
            out = out + self.ddp_anchor.sum()
        return out

    def delta_weight(self) -> torch.Tensor:
        delta = torch.zeros(self.weight_shape, dtype=self.weight_dtype, device=self.weight_device)
        delta.view(-1).index_add_(0, self.indices, self.values.detach().to(delta.dtype))
        return delta

    # -- merge ------------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """dequant(Wq) + folded + S: the exact float weight this layer computes with."""
        return effective_weight(self.quantized_base, self.weight_dtype, self.values, self.indices,
                                self.folded_indices, self.folded_values)

    @torch.no_grad()
    def merge(self) -> None:
        """Swap in a plain ``nn.Linear`` with the exact merged float weight (full precision
        while merged); ``unmerge`` restores the quantized layer."""
        if self.merged:
            return
        if self.__dict__.get("_float_stash") is not None:
            raise RuntimeError("merge inside float_base is not supported")
        base = self.base_layer
        self.base_layer = self._float_linear(self.merged_weight())
        self._merged_original = (base,)  # a tuple: not registered as a submodule

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer = self._merged_original[0]
        self._merged_original = None

    def extra_repr(self) -> str:
        return (f"entries={self.num_entries}, weight={self.weight_shape}, quantized={self.quant_format}"
                f"{', merged' if self.merged else ''}")


def requantized_layer(layer: QuantizedSparseDeltaLayer) -> tuple[nn.Module, dict]:
    """A bitsandbytes layer of ``layer``'s format holding dequant(Wq) + folded + S
    requantized, and the rounding error that costs (``quant.requantize_error``)."""
    fmt = layer.quant_format
    if fmt not in quant.QUANTIZE_FORMATS:
        raise ValueError(f"requantizing a {fmt} layer is not supported; merge into a dequantized model instead")
    exact = layer.merged_weight()
    base = layer.quantized_base
    template = nn.Linear(exact.shape[1], exact.shape[0], bias=base.bias is not None, device="meta")
    if base.bias is not None:
        template.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    out = quant.quantize_linear(template, fmt, weight=exact)
    err = quant.requantize_error(exact, quant.dequantize(out, exact.dtype),
                                 exact - quant.dequantize(base, exact.dtype))
    return out, err


def requantize_deltas(model: nn.Module) -> dict:
    """Replace every quantized-base delta layer in ``model`` by a bitsandbytes layer of its
    format holding its merged weight requantized, and report the rounding error that
    costs: per layer and overall (also as a warning). Float-base layers are left alone."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedSparseDeltaLayer)}
    report: dict = {"layers": {}}
    err_sq = delta_sq = total_abs = 0.0
    count = 0
    for name, layer in layers.items():
        new, err = requantized_layer(layer)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        report["layers"][name] = err
        err_sq += err["error_norm"] ** 2
        delta_sq += err["delta_norm"] ** 2
        n = layer.weight_numel
        total_abs += err["mean_abs_error"] * n
        count += n
    if layers:
        report["max_abs_error"] = max(e["max_abs_error"] for e in report["layers"].values())
        report["mean_abs_error"] = total_abs / count
        report["error_relative_to_delta"] = (err_sq ** 0.5) / (delta_sq ** 0.5) if delta_sq else float("inf")
        warnings.warn(
            f"requantized merge of {len(layers)} layers: the merged weights were rounded back to their "
            f"quantized format, max |error| {report['max_abs_error']:.3g}, mean |error| "
            f"{report['mean_abs_error']:.3g}, error norm {report['error_relative_to_delta']:.3g}x the delta's norm; "
            "the model no longer computes exactly what was trained (keep the delta separate, or merge into a "
            "dequantized model, for exact results)", UserWarning, stacklevel=3)
    return report


@contextlib.contextmanager
def float_bases(layers) -> Iterator[None]:
    """``float_base`` for every quantized-base layer among ``layers`` (others untouched)."""
    with contextlib.ExitStack() as stack:
        for layer in layers:
            if isinstance(layer, QuantizedSparseDeltaLayer) and not layer.merged:
                stack.enter_context(layer.float_base())
        yield
