"""Training under bf16 autocast: the sparse-delta layer (float, NF4 and int8 bases) runs
its matmuls in bf16 like an autocast ``nn.Linear`` and its gradients equal a dense bf16
reference (a float linear on W + S under the same autocast) within bf16 tolerance, for
every method family, with and without gradient checkpointing."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparseft import ConfigError, SparseConfig, get_sparse_model
from sparseft.config import CalibrationOptions, DynamicOptions, GrowDropOptions
from sparseft.delta.layer import SparseDeltaLayer
from sparseft.train import SparseController, create_optimizer, enable_gradient_checkpointing

from conftest import tiny_llama

BF16 = torch.bfloat16


def _close(actual, expected, rel=2e-2):
    """Equal within bf16 rounding, relative to the tensor's own scale."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rel, atol=rel * scale)


def _dense_reference(weight, bias, indices, values, x, transposed, weights_out):
    """Output and gradients (x, values, bias) of a plain float linear on W + S, S a
    differentiable scatter of ``values``, under the same bf16 autocast."""
    values = values.detach().clone().requires_grad_(True)
    bias = bias.detach().clone().requires_grad_(True) if bias is not None else None
    x = x.detach().clone().requires_grad_(True)
    w = weight.detach() + torch.zeros(weight.numel()).index_add(0, indices.long(), values).view_as(weight)
    with torch.autocast("cpu", dtype=BF16):
        y = F.linear(x, w.t() if transposed else w, bias)
    (y.float() * weights_out).sum().backward()
    return y.detach(), x.grad, values.grad, None if bias is None else bias.grad


class _Conv1D(nn.Module):
    """GPT-2's Conv1D layout (weight ``in x out``), recognised by name."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)


_Conv1D.__name__ = "Conv1D"


@pytest.mark.parametrize("weight_mode", ["inplace", "scratch", "clone"])
@pytest.mark.parametrize("backend", ["auto", "gather", "sampled_addmm"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_float_base_layer_under_bf16_autocast_matches_a_dense_reference(kind, backend, weight_mode):
    torch.manual_seed(0)
    base = nn.Linear(64, 48) if kind == "linear" else _Conv1D(48, 64)
    base.bias.requires_grad_(True)
    n = base.weight.numel()
    idx = torch.randperm(n)[: n // 10].sort().values.to(torch.int32)
    w0 = base.weight.detach().clone()
    layer = SparseDeltaLayer(base, idx, backend=backend, weight_mode=weight_mode)
    with torch.no_grad():
        layer.values.copy_(torch.randn(idx.numel()) * 0.1)
    x = torch.randn(2, 7, 64, requires_grad=True)
    weights_out = torch.linspace(-1, 1, 48)
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
    assert y.dtype == BF16
    (y.float() * weights_out).sum().backward()
    assert x.grad.dtype == layer.values.grad.dtype == base.bias.grad.dtype == torch.float32
    ref_y, ref_gx, ref_gv, ref_gb = _dense_reference(base.weight, base.bias, idx, layer.values, x,
                                                     kind == "conv1d", weights_out)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=0)  # the same bf16 matmul
    _close(x.grad, ref_gx)
    _close(layer.values.grad, ref_gv)
    _close(base.bias.grad, ref_gb)
    assert torch.equal(base.weight, w0) and base.weight.dtype == torch.float32  # W restored, still float32


def lm_batch(seed, batch=2, seq=12):
    ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# One method of each family: a static calibration scorer, random, a dynamic schedule,
# ID3 (incremental), grow-drop, and DST (float base only).
METHODS = {
    "gradient": {},
    "random": {},
    "dynamic": {"method": "gradient", "schedule": "dynamic", "dynamic": DynamicOptions(update_every=1, score_window=1)},
    "id3": {},
    "grow-drop": {"grow_drop": GrowDropOptions(every=1)},
    "dst": {},
}
BASES = ("float", "nf4", "int8")


def _reference_value_grads(model, batch):
    """The dense weights' gradients of a float model holding each layer's W + S, one
    backward under bf16 autocast, read at each layer's indexed entries."""
    ref = tiny_llama()
    ref.train()
    layers = model.sparse_layers()
    for name, layer in layers.items():
        ref.get_submodule(name).weight.data.copy_(layer.weight.detach().float() + layer.delta_weight().float())
    for p in ref.parameters():
        p.requires_grad_(False)
    for name in layers:
        ref.get_submodule(name).weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16):
        loss = ref(**batch).loss
    loss.float().backward()
    return float(loss.detach()), {name: ref.get_submodule(name).weight.grad.reshape(-1)[layer.indices.long()]
                         for name, layer in layers.items()}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("base_kind", BASES)
@pytest.mark.parametrize("method", list(METHODS))
def test_one_bf16_autocast_step_matches_a_dense_reference(method, base_kind, checkpointing):
    opts = dict(METHODS[method])
    name = opts.pop("method", method)
    quantize = None if base_kind == "float" else base_kind
    if method == "dst" and quantize:
        with pytest.raises(ConfigError, match="cannot train on a quantized base"):
            SparseConfig(method=name, density=0.05, quantize=quantize)
        return
    base = tiny_llama()
    if checkpointing:
        enable_gradient_checkpointing(base)
    base.train()
    cfg = SparseConfig(method=name, density=0.05, quantize=quantize, calibration=CalibrationOptions(examples=4), **opts)
    model = get_sparse_model(base, cfg, calibration_data=[lm_batch(0), lm_batch(1)])
    opt = create_optimizer(model, lr=1e-2)
    ctl = SparseController(model, opt)
    ctl.train_begin(2)
    batch = lm_batch(2)
    ctl.before_optimizer_step(1)
    with torch.autocast("cpu", dtype=BF16):
        loss = model(**batch).loss
    loss.float().backward()
    ref_loss, ref_grads = _reference_value_grads(model, batch)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-2)
    for layer_name, layer in model.sparse_layers().items():
        assert layer.values.grad is not None and layer.values.grad.dtype == torch.float32
        _close(layer.values.grad, ref_grads[layer_name])
    ctl.before_update(1, opt)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ctl.after_optimizer_step(1, batch, opt)
    assert any(bool(layer.values.detach().abs().sum() > 0) for layer in model.sparse_layers().values())
