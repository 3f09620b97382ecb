"""The sparse-delta linear map and its backward, as an autograd.Function (eager) and as
torch custom ops (under torch.compile)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .backends import _as_2d, sddmm
from .layout import IndexLayout
from .weight import with_effective_weight


def _forward_kernel(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    # The matmul runs in the activations' dtype (under autocast, x arrives already cast):
    # the frozen weight and the bias are cast to it, as autocast casts an nn.Linear's.
    if w.dtype != x.dtype:
        w = w.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if transposed:
        # Same kernel as transformers' Conv1D (addmm), so zero values give bit-identical outputs.
        x2 = _as_2d(x)
        out = torch.addmm(bias, x2, w) if bias is not None else x2.matmul(w)
        return out.view(*x.shape[:-1], w.shape[-1])
    return F.linear(x, w, bias)


def _grad_input_kernel(grad_out: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:
    if w.dtype != grad_out.dtype:
        w = w.to(grad_out.dtype)
    return grad_out.matmul(w.t()) if transposed else grad_out.matmul(w)


class SparseDeltaFunction(torch.autograd.Function):
    """y = x @ (W + S)^T + b for Linear, y = x @ (W + S) + b for Conv1D."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, layout, transposed, backend, grad_observer, weight_mode="auto"):
        out = with_effective_weight(weight, values, layout, weight_mode, lambda w: _forward_kernel(x, w, bias, transposed))
        ctx.save_for_backward(x, weight, values, indices)
        ctx.layout = layout
        ctx.weight_mode = weight_mode
        ctx.transposed = transposed
        ctx.backend = backend
        ctx.has_bias = bias is not None
        ctx.grad_observer = grad_observer
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, values, indices = ctx.saved_tensors
        layout, mode, transposed, observer = ctx.layout, ctx.weight_mode, ctx.transposed, ctx.grad_observer

        def grad_input(g2):
            # Recomputing W + S costs O(k) (or one copy): cheaper than keeping a dense copy alive.
            return with_effective_weight(weight, values, layout, mode, lambda w: _grad_input_kernel(g2, w, transposed))

        def values_sddmm(row_factor, col_factor):
            owners = (x, None) if transposed else (None, x)
            return sddmm(row_factor, col_factor, layout, ctx.backend, *owners)

        grad_x, grad_bias, grad_values = delta_linear_backward(
            grad_out, x, values, indices, ctx.needs_input_grad, ctx.has_bias, transposed, grad_input, values_sddmm,
            observer)
        return grad_x, None, grad_bias, grad_values, None, None, None, None, None, None


def delta_linear_backward(grad_out: torch.Tensor, x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                          needs: tuple[bool, ...], has_bias: bool, transposed: bool,
                          grad_input: Callable[[torch.Tensor], torch.Tensor],
                          values_sddmm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                          grad_observer: Callable[[torch.Tensor], None] | None = None):
    """The one backward of both paths: (grad of x, of the bias, of the values), each None
    where ``needs`` (x, weight, bias, values, ...) does not ask for it. ``grad_input(g2)`` is
    ``g2 @ (W + S)`` (Linear) or its Conv1D form, ``values_sddmm(row_factor, col_factor)`` the
    values' gradient; the two paths differ only in how these run (direct calls or custom ops)."""
    grad_x = grad_bias = grad_values = None
    # One 2-D (contiguous) copy of the output gradient serves both matmuls below: a
    # non-contiguous one (e.g. from the attention heads' permute) would otherwise be copied twice.
    g2 = _as_2d(grad_out)
    if needs[0]:
        grad_x = grad_input(g2)
        grad_x = grad_x.view(*x.shape[:-1], grad_x.shape[-1])
    x2 = _as_2d(x)
    # Weight rows are outputs for Linear (W: out x in) and inputs for Conv1D (W: in x out).
    row_factor, col_factor = (x2, g2) if transposed else (g2, x2)
    # Only scoring steps ask for the dense gradient of the frozen weight; it then also
    # gives the values' gradient (a gather) instead of a separate SDDMM.
    dense = row_factor.t().matmul(col_factor) if grad_observer is not None else None
    if needs[3]:
        if dense is not None:
            grad_values = dense.reshape(-1).index_select(0, indices).to(values.dtype)
        else:
            grad_values = values_sddmm(row_factor, col_factor).to(values.dtype)
    if needs[2] and has_bias:
        grad_bias = g2.sum(0)
    if dense is not None:
        if dense.dtype in (torch.float16, torch.bfloat16):
            dense = dense.float()  # observers accumulate scores in float32
        grad_observer(dense)  # after the gather: an observer may reuse the buffer in place
    return grad_x, grad_bias, grad_values


# -- the same computation as torch custom ops, for torch.compile ---------------------------
# Dynamo cannot trace through SparseDeltaFunction's non-tensor arguments (the layout object,
# the observer callable) and would break the graph at every layer. Under torch.compile the
# layer calls these ops instead: opaque to the compiler, with the same kernels as above and
# their backward registered, so the compiled graph holds one node per sparse layer each way.
# (Scoring steps, which set a grad observer, keep the autograd.Function and graph-break.)
_OP_NS = "sparseft"


def _layout_from(indices, crow, col, rows, flat_long, weight_shape) -> IndexLayout:
    return IndexLayout(indices, weight_shape, parts=(crow, col, rows, flat_long))


@torch.library.custom_op(f"{_OP_NS}::delta_linear", mutates_args=())
def _delta_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor,
                     indices: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, rows: torch.Tensor,
                     flat_long: torch.Tensor, transposed: bool, weight_mode: str, backend: str) -> torch.Tensor:
    # ``backend`` is the SDDMM backend of the backward. W is changed and restored bit for bit inside ("inplace" mode): nothing mutated on exit.
    layout = _layout_from(indices, crow, col, rows, flat_long, weight.shape)
    return with_effective_weight(weight, values, layout, weight_mode, lambda w: _forward_kernel(x, w, bias, transposed))


@_delta_linear_op.register_fake
def _(x, weight, bias, values, indices, crow, col, rows, flat_long, transposed, weight_mode, backend):
    out_features = weight.shape[1] if transposed else weight.shape[0]
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op(f"{_OP_NS}::delta_grad_input", mutates_args=())
def _delta_grad_input_op(grad_out: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                         crow: torch.Tensor, col: torch.Tensor, rows: torch.Tensor, flat_long: torch.Tensor,
                         transposed: bool, weight_mode: str) -> torch.Tensor:
    layout = _layout_from(indices, crow, col, rows, flat_long, weight.shape)
    return with_effective_weight(weight, values, layout, weight_mode,
                                 lambda w: _grad_input_kernel(grad_out, w, transposed))


@_delta_grad_input_op.register_fake
def _(grad_out, weight, values, indices, crow, col, rows, flat_long, transposed, weight_mode):
    in_features = weight.shape[0] if transposed else weight.shape[1]
    return grad_out.new_empty((*grad_out.shape[:-1], in_features))


@torch.library.custom_op(f"{_OP_NS}::sddmm", mutates_args=())
def _sddmm_op(row_factor: torch.Tensor, col_factor: torch.Tensor, indices: torch.Tensor, crow: torch.Tensor,
              col: torch.Tensor, rows: torch.Tensor, flat_long: torch.Tensor, weight_rows: int, weight_cols: int,
              backend: str) -> torch.Tensor:
    layout = _layout_from(indices, crow, col, rows, flat_long, (weight_rows, weight_cols))
    return sddmm(row_factor, col_factor, layout, backend)


@_sddmm_op.register_fake
def _(row_factor, col_factor, indices, crow, col, rows, flat_long, weight_rows, weight_cols, backend):
    return row_factor.new_empty((indices.shape[0],))


def _delta_linear_setup(ctx, inputs, output):
    x, weight, bias, values, indices, crow, col, rows, flat_long, transposed, weight_mode, backend = inputs
    ctx.save_for_backward(x, weight, values, indices, crow, col, rows, flat_long)
    ctx.transposed = transposed
    ctx.weight_mode = weight_mode
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _delta_linear_backward(ctx, grad_out):
    x, weight, values, indices, crow, col, rows, flat_long = ctx.saved_tensors
    transposed = ctx.transposed

    def grad_input(g2):
        return _delta_grad_input_op(g2, weight, values, indices, crow, col, rows, flat_long, transposed,
                                    ctx.weight_mode)

    def values_sddmm(row_factor, col_factor):
        return _sddmm_op(row_factor, col_factor, indices, crow, col, rows, flat_long, weight.shape[0],
                         weight.shape[1], ctx.backend)

    grad_x, grad_bias, grad_values = delta_linear_backward(
        grad_out, x, values, indices, ctx.needs_input_grad, ctx.has_bias, transposed, grad_input, values_sddmm)
    return grad_x, None, grad_bias, grad_values, None, None, None, None, None, None, None, None


_delta_linear_op.register_autograd(_delta_linear_backward, setup_context=_delta_linear_setup)


def _autocast_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run this linear in, where it differs from x's; else None."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or not weight.is_floating_point():
        return None
    dtype = torch.get_autocast_dtype(device)
    if x.dtype == dtype or x.dtype == torch.float64 or not x.is_floating_point():
        return None
    return dtype


def sparse_delta_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor,
                        layout: IndexLayout, transposed: bool, backend: str = "auto", weight_mode: str = "auto",
                        grad_observer: Callable[[torch.Tensor], None] | None = None,
                        use_op: bool | None = None) -> torch.Tensor:
    """y = x @ (W + S)^T + b (Linear) or x @ (W + S) + b (Conv1D) with the sparse-delta backward.

    ``use_op`` picks the custom-op path (default: only while torch.compile traces); the
    autograd.Function path is taken otherwise and whenever a grad observer is set.
    """
    if use_op is None:
        use_op = torch.compiler.is_compiling()
    compute = _autocast_dtype(x, weight)
    if compute is not None:
        # Cast outside the kernels, as autocast casts an nn.Linear's input: autograd then
        # returns x's gradient in x's dtype, and the kernels see one dtype throughout.
        x = x.to(compute)
    if use_op and grad_observer is None:
        return _delta_linear_op(x, weight, bias, values, layout.indices, *layout.parts, transposed, weight_mode, backend)
    return SparseDeltaFunction.apply(x, weight, bias, values, layout.indices, layout, transposed, backend,
                                     grad_observer, weight_mode)
