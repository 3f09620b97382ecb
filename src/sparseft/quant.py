"""A quantized frozen base: targeted ``nn.Linear`` weights kept as 4-bit NF4 or 8-bit
integers (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``), never as a float copy.

A layer's float weight exists only while one of its matmuls runs: ``dequantize`` builds
it, the caller adds the sparse delta into that fresh buffer, uses it and drops it. The
formats are bitsandbytes' own, so a model quantized here is the same base that peft's
QLoRA trains on, and a model the user quantized with bitsandbytes is accepted as is.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Iterator

import torch
import torch.nn as nn

from .config import QUANTIZE_FORMATS

__all__ = ["QUANTIZE_FORMATS", "dequantize", "is_quantized", "quantize_linear", "quantize_modules"]
# bitsandbytes' 4-bit block size (QLoRA's): one absmax per 64 weights, the absmaxes
# themselves quantized to 8 bits ("double quantization"): ~4.13 bits per weight.
NF4_BLOCK_SIZE = 64


class QuantizationUnavailable(ImportError):
    """bitsandbytes is not installed."""


@contextlib.contextmanager
def quiet_bitsandbytes_import() -> Iterator[None]:
    """Within the block, importing bitsandbytes (directly, or through peft, which imports it
    whenever it is installed) logs nothing below errors: on a CPU with AVX512-BF16 it warns
    at import about an optional kernels package, which no run here needs, and that package,
    when installed, warns in offline mode that it cannot check the kernels' publisher."""
    logs = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def _bnb():
    """bitsandbytes, imported on first use (only a quantized base needs it), quietly."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    try:
        with quiet_bitsandbytes_import():
            import bitsandbytes
    except ImportError:
        raise QuantizationUnavailable(
            "a quantized base needs bitsandbytes: pip install 'sparseft[quant]'") from None
    return bitsandbytes


def quantized_format(module: nn.Module) -> str | None:
    """``"nf4"``/``"fp4"``/``"int8"`` for a bitsandbytes quantized linear layer, else None
    (bitsandbytes is not imported for this: a model holding its layers has imported it)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        state = getattr(module.weight, "quant_state", None)
        return state.quant_type if state is not None else module.weight.quant_type
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    return None


def is_quantized(module: nn.Module) -> bool:
    return quantized_format(module) is not None


def _int8_ready(module: nn.Module) -> None:
    w = module.weight
    if getattr(w, "SCB", None) is None or w.dtype != torch.int8:
        raise ValueError("a Linear8bitLt base must hold quantized int8 weights (has_fp16_weights=False, "
                         "moved to its device once so that bitsandbytes quantizes it)")
    if module.state.threshold > 0:
        raise ValueError("a Linear8bitLt base with an outlier threshold (LLM.int8() decomposition) keeps part of "
                         "its weight in 16 bits; sparseft supports threshold=0.0 (plain int8) only")


def _nf4_ready(module: nn.Module) -> None:
    state = getattr(module.weight, "quant_state", None)
    if state is None:
        raise ValueError("a Linear4bit base must hold quantized weights: move it to its device once "
                         "(bitsandbytes quantizes on the first .to())")
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a Linear4bit in place at its first CPU forward in eval mode
        # without gradients (CPUs with AVX512-BF16), rounding its scales to bf16.
        raise ValueError("this Linear4bit was repacked by bitsandbytes for CPU inference (its scales rounded "
                         "to bf16): quantize the float weights again for fine-tuning")


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a quantized layer (its packed weight has another shape)."""
    fmt = quantized_format(module)
    if fmt in ("nf4", "fp4"):
        _nf4_ready(module)
        rows, cols = module.weight.quant_state.shape
        return int(rows), int(cols)
    return int(module.out_features), int(module.in_features)


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype the weight had before quantization (4-bit: recorded by bitsandbytes;
    int8: recorded by ``quantize_linear``, else the bias's dtype, else float32) - the dtype of the dequantized weight and of the
    sparse values."""
    if quantized_format(module) in ("nf4", "fp4"):
        _nf4_ready(module)
        return module.weight.quant_state.dtype
    recorded = getattr(module, "sparseft_float_dtype", None)  # set by quantize_linear
    if recorded is not None:
        return recorded
    bias = getattr(module, "bias", None)
    return bias.dtype if bias is not None and bias.is_floating_point() else torch.float32


def dequantize(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's weight as a fresh float tensor (out x in), in ``dtype`` (default
    ``weight_dtype``). The caller owns it and may write into it."""
    bnb = _bnb()
    fmt = quantized_format(module)
    dtype = dtype or weight_dtype(module)
    if fmt in ("nf4", "fp4"):
        _nf4_ready(module)
        w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    elif fmt == "int8":
        _int8_ready(module)
        # Row-wise absmax: W = CB * SCB / 127 (bitsandbytes' definition), in one pass.
        w = torch.mul(module.weight.data, (module.weight.SCB.float() / 127.0).unsqueeze(1))
    else:
        raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantized linear layer")
    return w if w.dtype == dtype else w.to(dtype)


def quantized_nbytes(module: nn.Module) -> int:
    """Bytes the quantized weight takes (packed data and scales, bias excluded)."""
    w = module.weight
    total = w.numel() * w.element_size()
    state = getattr(w, "quant_state", None)
    if state is not None:
        total += state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    scb = getattr(w, "SCB", None)
    if scb is not None:
        total += scb.numel() * scb.element_size()
    return int(total)


def quantize_linear(linear: nn.Linear, fmt: str, weight: torch.Tensor | None = None) -> nn.Module:
    """A bitsandbytes layer holding ``weight`` (default: ``linear.weight``) quantized to
    ``fmt``, with ``linear``'s bias (kept in float) and device. Deterministic: the same
    float weight always gives the same quantized one."""
    if fmt not in QUANTIZE_FORMATS:
        raise ValueError(f"quantize={fmt!r}; choose one of {', '.join(QUANTIZE_FORMATS)}")
    if not isinstance(linear, nn.Linear) and weight is None:
        raise TypeError(f"only nn.Linear layers can be quantized, not {type(linear).__name__}")
    bnb = _bnb()
    w = (linear.weight if weight is None else weight).detach()
    out_f, in_f = w.shape
    bias = linear.bias
    device = w.device
    if fmt == "nf4":
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=w.dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(w.contiguous(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", blocksize=NF4_BLOCK_SIZE)
    else:
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=0.0,
                                    device="meta")
        layer.weight = bnb.nn.Int8Params(w.contiguous(), requires_grad=False, has_fp16_weights=False)
        layer.sparseft_float_dtype = w.dtype
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    # bitsandbytes quantizes a float weight when it is first moved to a device.
    layer = layer.to(device)
    if fmt == "nf4":
        # Otherwise bitsandbytes repacks the weight in place at its first CPU forward in eval
        # mode without gradients (CPUs with AVX512-BF16), rounding its scales to bf16: the
        # model would evaluate on another base than it trained on (and the repacking fails
        # for layers narrower than a block). Layers built here keep one format throughout.
        layer.support_avx512bf16_for_cpu = False
    layer.weight.requires_grad_(False)
    layer.train(linear.training)
    return layer


def _parent_and_child(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def release_freed_memory() -> None:
    """Hand memory freed inside the process back to the system (glibc's ``malloc_trim``;
    nothing elsewhere). The float weights a quantization frees stay in the heap, counted
    in the process's resident memory, until something reuses them or this is called."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def quantize_modules(model: nn.Module, names: list[str], fmt: str) -> int:
    """Replace each named ``nn.Linear`` by its quantized form (layers already quantized in
    ``fmt`` are kept), then release the freed float weights (``release_freed_memory``).
    Returns how many were quantized here."""
    count = 0
    for name in names:
        module = model.get_submodule(name)
        found = quantized_format(module)
        if found is not None:
            if found != fmt:
                raise ValueError(f"module {name!r} is quantized as {found} already, not {fmt}")
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"module {name!r} ({type(module).__name__}) cannot be quantized: only nn.Linear "
                             "layers can (GPT-2's Conv1D is not supported)")
        parent, child = _parent_and_child(model, name)
        setattr(parent, child, quantize_linear(module, fmt))
        del module
        count += 1
    if count:
        release_freed_memory()
    return count


def requantize_error(exact: torch.Tensor, requantized: torch.Tensor, delta: torch.Tensor) -> dict[str, Any]:
    """How far a requantized merged weight lies from the exact one (W + S): max and mean
    absolute error, and the error relative to the delta's own size (1.0: as large as S)."""
    err = (requantized.float() - exact.float())
    delta_norm = float(delta.float().norm())
    return {
        "max_abs_error": float(err.abs().max()) if err.numel() else 0.0,
        "mean_abs_error": float(err.abs().mean()) if err.numel() else 0.0,
        "error_norm": float(err.norm()),
        "delta_norm": delta_norm,
        "error_relative_to_delta": float(err.norm()) / delta_norm if delta_norm else float("inf"),
    }
