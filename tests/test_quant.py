"""A quantized frozen base (NF4 / int8 via bitsandbytes): the layer's outputs and gradients
equal a dense float reference built on dequant(W); every method trains on it (also with
gradient checkpointing and bf16 autocast); adapters save, load and merge exactly; the
requantized merge states its rounding error; DST and unsupported layers are refused."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("bitsandbytes")

import sparseft  # noqa: E402
from sparseft import ConfigError, SparseConfig, SparseModel, get_sparse_model  # noqa: E402
from sparseft import quant  # noqa: E402
from sparseft.config import CalibrationOptions, DynamicOptions, GrowDropOptions, ID3Options  # noqa: E402
from sparseft.delta.quantized import QuantizedSparseDeltaLayer  # noqa: E402
from sparseft.train import SparseController, create_optimizer, enable_gradient_checkpointing  # noqa: E402

from conftest import tiny_llama  # noqa: E402

FORMATS = ("nf4", "int8")


def quantized_layer(fmt, rows=48, cols=64, bias=True, density=0.1, seed=0):
    torch.manual_seed(seed)
    base = quant.quantize_linear(nn.Linear(cols, rows, bias=bias), fmt)
    n = rows * cols
    idx = torch.randperm(n)[: int(density * n)].sort().values.to(torch.int32)
    layer = QuantizedSparseDeltaLayer(base)
    layer.set_indices(idx, torch.randn(idx.numel()) * 0.1)
    return layer


def dense_reference(layer, x, folded=None):
    """Loss, and gradients of x, the values and the bias, through a plain float linear on
    dequant(W) (+ folded) + S, with S built by a differentiable scatter."""
    w = quant.dequantize(layer.quantized_base).detach()
    if folded is not None:
        w.view(-1).index_add_(0, folded[0], folded[1])
    values = layer.values.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True) if layer.bias is not None else None
    x = x.detach().clone().requires_grad_(True)
    s = torch.zeros(w.numel()).index_add(0, layer.indices.long(), values).view_as(w)
    y = F.linear(x, w + s, bias)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, values.grad, None if bias is None else bias.grad


@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_matches_a_dense_reference_on_the_dequantized_weight(fmt):
    layer = quantized_layer(fmt)
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    ref_y, ref_gx, ref_gv, ref_gb = dense_reference(layer, x)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.values.grad, ref_gv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, ref_gb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_weight_reads_as_the_dequantized_weight_and_no_float_copy_is_saved(fmt):
    layer = quantized_layer(fmt, bias=False)
    w = layer.weight
    assert w.dtype == torch.float32 and tuple(w.shape) == (48, 64) == layer.weight_shape
    torch.testing.assert_close(w, quant.dequantize(layer.base_layer), rtol=0, atol=0)
    assert layer.weight_numel == 48 * 64
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(torch.randn(3, 64, requires_grad=True))
    assert all(t.numel() != 48 * 64 or not t.is_floating_point() for t in saved), \
        "the graph keeps a weight-sized float tensor"
    y.sum().backward()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", ["auto", "sampled_addmm"])
def test_a_quantized_layer_keeps_one_int32_index_and_its_columns(fmt, backend):
    """Beside the int32 index, a training step on a quantized base keeps only the CSR
    pattern (int32 columns, row offsets): no int64 copy of the index, no per-entry rows."""
    layer = quantized_layer(fmt)
    layer.backend = backend
    for _ in range(2):
        layer(torch.randn(2, 5, 64, requires_grad=True)).sum().backward()
    layout = layer.layout
    kept = [t for t in vars(layout).values() if isinstance(t, torch.Tensor) and t is not layer.indices]
    assert layout.col.dtype == torch.int32 and layout.crow.dtype == torch.int32
    assert all(t.dtype == torch.int32 for t in kept)
    assert sum(t.numel() for t in kept) == layer.num_entries + 48 + 1  # columns, row offsets
    float_layer = sparseft.SparseDeltaLayer(nn.Linear(64, 48), layer.indices, weight_mode="inplace")
    float_layer(torch.randn(3, 64)).sum().backward()
    assert float_layer.layout.flat_long.dtype == torch.int64  # built for the in-place weight mode, then kept


@pytest.mark.parametrize("fmt", FORMATS)
def test_folded_entries_and_grad_observer(fmt):
    layer = quantized_layer(fmt)
    packed = layer.base_layer.weight.detach().clone()
    fidx = torch.tensor([1, 7, 100], dtype=torch.int32)
    fval = torch.tensor([0.5, -0.25, 1.0])
    layer.fold_into_base(fidx, fval)
    assert torch.equal(layer.base_layer.weight, packed), "folding never writes into the quantized weight"
    seen = []
    layer.grad_observer = lambda g: seen.append(g.clone())
    x = torch.randn(4, 64, requires_grad=True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    ref_y, ref_gx, ref_gv, _ = dense_reference(layer, x, folded=(fidx, fval))
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.values.grad, ref_gv, rtol=1e-4, atol=1e-5)
    dense_grad = (torch.linspace(-1, 1, 48).expand(4, 48)).t() @ x.detach()
    torch.testing.assert_close(seen[0], dense_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight, quant.dequantize(layer.base_layer).index_put(
        (fidx.long() // 64, fidx.long() % 64), fval, accumulate=True))
    layer.restore_base()
    assert layer.num_folded == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_bf16_autocast_matches_a_bf16_reference(fmt):
    layer = quantized_layer(fmt)
    x = torch.randn(2, 6, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.values.grad.dtype == torch.float32
    w = (quant.dequantize(layer.base_layer) + layer.delta_weight()).bfloat16()
    ref = F.linear(x.detach().bfloat16(), w, layer.bias.detach().bfloat16())
    torch.testing.assert_close(y.detach(), ref, rtol=0, atol=0)
    g = torch.ones(12, 48, dtype=torch.bfloat16)
    ref_gv = (g.float().t() @ x.detach().bfloat16().reshape(12, 64).float()).reshape(-1)[layer.indices.long()]
    torch.testing.assert_close(layer.values.grad, ref_gv, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_swaps_in_the_exact_float_weight_and_unmerge_restores_the_quantized_layer(fmt):
    layer = quantized_layer(fmt)
    base = layer.base_layer
    x = torch.randn(3, 64)
    y = layer(x).detach()
    layer.merge()
    assert isinstance(layer.base_layer, nn.Linear) and not quant.is_quantized(layer.base_layer)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    layer.unmerge()
    assert layer.base_layer is base
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


def lm_batches(n, batch=2, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def run_steps(model, batches, autocast=False, steps=2):
    """The training loop's per-step calls (SparseController), forward optionally under
    bf16 autocast; returns the losses."""
    opt = create_optimizer(model, lr=1e-2)
    ctl = SparseController(model, opt)
    ctl.train_begin(steps)
    losses = []
    for step in range(1, steps + 1):
        batch = batches[(step - 1) % len(batches)]
        ctl.before_optimizer_step(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.float().backward()
        ctl.before_update(step, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctl.after_optimizer_step(step, batch, opt)
        losses.append(float(loss.detach()))
    ctl.train_end(opt)
    return losses


METHOD_CONFIGS = {
    "random": {}, "magnitude": {}, "gradient": {}, "snip": {}, "taylor": {}, "fisher": {}, "grasp": {},
    "synflow": {}, "d3": {"id3": ID3Options(d3_exponent=1.0)},
    "id3": {}, "grow-drop": {"grow_drop": GrowDropOptions(every=1)},
    "dynamic": {"method": "gradient", "schedule": "dynamic", "dynamic": DynamicOptions(update_every=1, score_window=1)},
}


@pytest.mark.parametrize("variant", ["plain", "checkpointing", "autocast"])
@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_every_method_trains_on_a_quantized_base(name, variant):
    opts = dict(METHOD_CONFIGS[name])
    method = opts.pop("method", name)
    base = tiny_llama()
    if variant == "checkpointing":
        enable_gradient_checkpointing(base)
    base.train()
    cfg = SparseConfig(method=method, density=0.05, quantize="nf4", calibration=CalibrationOptions(examples=4), **opts)
    model = get_sparse_model(base, cfg, calibration_data=lm_batches(2))
    layers = model.sparse_layers()
    assert all(isinstance(layer, QuantizedSparseDeltaLayer) for layer in layers.values())
    packed = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    losses = run_steps(model, lm_batches(2, seed=1), autocast=variant == "autocast", steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert model.num_sparse_params() > 0
    assert any(bool(layer.values.detach().abs().sum() > 0) for layer in layers.values()), "values never moved"
    for n, layer in layers.items():
        assert torch.equal(layer.quantized_base.weight, packed[n]), "the quantized weight changed"


@pytest.mark.parametrize("method", ["magnitude", "snip", "d3", "synflow", "grasp"])
def test_quantized_scores_equal_float_scores_on_the_dequantized_weights(method):
    """Scorers read |w| and dense gradients from dequant(W): on a float model holding the
    same dequantized weights they choose the same entries."""
    batches = lm_batches(2)
    opts = dict(method=method, density=0.05, calibration=CalibrationOptions(examples=4), id3=ID3Options(d3_exponent=1.0))
    quantized = get_sparse_model(tiny_llama(), SparseConfig(quantize="int8", **opts), calibration_data=batches)
    floating = tiny_llama()
    for name, layer in quantized.sparse_layers().items():
        floating.get_submodule(name).weight.data.copy_(layer.weight)
    reference = get_sparse_model(floating, SparseConfig(**opts), calibration_data=batches)
    same = sum(int(torch.isin(layer.indices, reference.sparse_layers()[n].indices).sum())
               for n, layer in quantized.sparse_layers().items())
    assert same >= 0.99 * reference.num_sparse_params()


def test_dst_is_refused_on_a_quantized_base():
    with pytest.raises(ConfigError, match="cannot train on a quantized base"):
        SparseConfig(method="dst", density=0.05, quantize="nf4")
    base = tiny_llama()
    quant.quantize_modules(base, ["model.layers.0.self_attn.q_proj"], "nf4")
    with pytest.raises(ConfigError, match="cannot train on a quantized base"):
        get_sparse_model(base, SparseConfig(method="dst", density=0.05))


def test_unknown_format_and_conv1d_are_refused():
    with pytest.raises(ConfigError, match="quantize='int4'"):
        SparseConfig(quantize="int4")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ValueError, match="Conv1D is not supported"):
        get_sparse_model(gpt2, SparseConfig(density=0.05, quantize="nf4"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_adapter_round_trip_on_a_quantized_base(tmp_path, fmt):
    batches = lm_batches(2)
    model = get_sparse_model(tiny_llama(), SparseConfig(method="gradient", density=0.05, quantize=fmt,
                                                        schedule="dynamic", dynamic=DynamicOptions(update_every=1, score_window=1),
                                                        calibration=CalibrationOptions(examples=4)), calibration_data=batches)
    model.train()
    run_steps(model, batches, steps=3)
    assert model.num_folded_params() > 0, "the dynamic schedule folded no entries"
    model.eval()
    with torch.no_grad():
        expected = model(**batches[0]).logits
    model.save_pretrained(tmp_path)
    # A fresh float base: from_pretrained quantizes it the same way (deterministic).
    loaded = SparseModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, expected, rtol=0, atol=0)
    # A base the user quantized already is accepted as it is.
    pre = tiny_llama()
    quant.quantize_modules(pre, model.target_names, fmt)
    again = SparseModel.from_pretrained(pre, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batches[0]).logits, expected, rtol=0, atol=0)
    # merge_and_unload: plain float Linear layers holding dequant(W) + folded + S, exactly.
    merged = loaded.merge_and_unload()
    assert not any(quant.is_quantized(m) for m in merged.modules())
    bad = [(n, p.dtype) for n, p in merged.named_parameters() if p.dtype != torch.float32]
    assert not bad, bad
    with torch.no_grad():
        torch.testing.assert_close(merged(**batches[0]).logits, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_requantized_merge_states_its_rounding_error(fmt):
    batches = lm_batches(2)
    model = get_sparse_model(tiny_llama(), SparseConfig(method="random", density=0.05, quantize=fmt))
    model.train()
    run_steps(model, batches, steps=2)
    model.eval()
    with torch.no_grad():
        expected = model(**batches[0]).logits
    exact = {n: layer.merged_weight() for n, layer in model.sparse_layers().items()}
    with pytest.warns(UserWarning, match="requantiz"):
        merged = model.merge_and_unload(requantize=True)
    report = model.merge_report
    assert set(report["layers"]) == set(exact)
    for name, stats in report["layers"].items():
        module = merged.get_submodule(name)
        assert quant.quantized_format(module) == fmt
        err = (quant.dequantize(module) - exact[name]).abs()
        assert stats["max_abs_error"] == pytest.approx(float(err.max()), rel=1e-6)
    assert report["max_abs_error"] > 0
    with torch.no_grad():
        drift = (merged(**batches[0]).logits - expected).abs().max()
    assert 0 < float(drift) < 1.0


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory):
    from _tiny import sentiment_rows, tiny_llama_dir, write_rows

    d = tmp_path_factory.mktemp("tiny")
    tiny_llama_dir(d / "llama")
    write_rows(d / "train.jsonl", sentiment_rows(32))
    write_rows(d / "eval.jsonl", sentiment_rows(8, seed=1))
    return d


def _train_args(files, out, *extra):
    return ["train", "--model", str(files / "llama"), "--train-file", str(files / "train.jsonl"),
            "--eval-file", str(files / "eval.jsonl"), "--prompt-column", "prompt", "--target-column", "target",
            "--max-new-tokens", "2", "--match-lora-rank", "1", "--max-steps", "2", "--batch-size", "8",
            "--out", str(out), "--no-progress", *extra]


@pytest.mark.parametrize("method", ["gradient", "lora"])
def test_cli_trains_on_a_quantized_base_and_lora_is_qlora(llama_files, tmp_path, method):
    import json

    pytest.importorskip("peft")
    from sparseft.app.cli import main

    out = tmp_path / method
    assert main(_train_args(llama_files, out, "--method", method, "--quantize", "nf4")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["quantize"] == "nf4" and m["trainable_params"] > 0
    if method == "lora":
        assert m["config"]["rank"] == 1
        return
    from sparseft.app.runner import evaluate_adapter

    again = evaluate_adapter(str(out / "adapter"))  # the float base is quantized again on load
    assert again["score"] == m["score"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_qlora_baseline_wraps_the_same_quantized_layers(fmt):
    pytest.importorskip("peft")
    from sparseft.app.baselines import BaselineConfig, get_baseline_model

    model = get_baseline_model(tiny_llama(), BaselineConfig(method="lora", lora_rank=2, quantize=fmt))
    wrapped = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert len(wrapped) == 14 and all(quant.quantized_format(m.base_layer) == fmt for m in wrapped)
    opt = model.create_optimizer(1e-2)
    batch = lm_batches(1)[0]
    model.train()
    model(**batch).loss.backward()
    opt.step()
    sparse = get_sparse_model(tiny_llama(), SparseConfig(match_lora_rank=2, quantize=fmt))
    assert model.trainable_summary()["sparse_params"] == sparse.num_sparse_params()


def test_cli_refuses_dst_and_full_on_a_quantized_base(llama_files, tmp_path, capsys):
    from sparseft.app.cli import main

    assert main(_train_args(llama_files, tmp_path / "d", "--method", "dst", "--quantize", "nf4")) == 2
    assert "cannot train on a quantized base" in capsys.readouterr().err
    assert main(_train_args(llama_files, tmp_path / "f", "--method", "full", "--quantize", "nf4")) == 2
    assert "full fine-tuning trains the float weights" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_bf16_model_trains_in_bf16(fmt):
    base = tiny_llama().to(torch.bfloat16)
    model = get_sparse_model(base, SparseConfig(method="random", density=0.05, quantize=fmt))
    layer = next(iter(model.sparse_layers().values()))
    assert layer.weight_dtype == layer.values.dtype == layer.weight.dtype == torch.bfloat16
    model.train()
    losses = run_steps(model, lm_batches(2), steps=2)
    assert all(torch.isfinite(torch.tensor(losses)))
