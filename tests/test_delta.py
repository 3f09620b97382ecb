"""SparseDeltaLayer / SparseDeltaFunction against a dense reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from sparseft import delta as delta_mod
from sparseft.delta import backends
from sparseft.delta import IndexLayout, SparseDeltaLayer, sddmm, validate_indices

SHAPES = [(8, 5), (5, 12), (1, 16), (16, 1), (7, 7)]  # (out, in): out>in, in>out, 1xN, Nx1, square
BACKENDS = ["sampled_addmm", "gather", "dense", "native", "auto"]


def random_indices(numel: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(numel, generator=gen)[:k].sort().values.to(torch.int32)


def make_base(kind: str, out_f: int, in_f: int, bias: bool, gen: torch.Generator, dtype=torch.float32) -> nn.Module:
    if kind == "linear":
        layer = nn.Linear(in_f, out_f, bias=bias)
    else:
        layer = Conv1D(out_f, in_f)  # weight is (in, out)
        if not bias:
            layer.bias = None
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    return layer.to(dtype)


def dense_reference(kind, weight, bias, idx, values, x):
    """y computed from a plain dense weight W (requires grad) plus the scattered values."""
    w = weight.detach().clone().float().requires_grad_(True)
    s = torch.zeros_like(w)
    s.view(-1)[idx.long()] = values.detach().float()
    b = None if bias is None else bias.detach().clone().float().requires_grad_(True)
    xr = x.detach().clone().float().requires_grad_(True)
    w_eff = w + s
    if kind == "linear":
        y = F.linear(xr, w_eff, b)
    else:
        y = xr.matmul(w_eff)
        if b is not None:
            y = y + b
    return y, w, b, xr


def assert_close(actual, expected, dtype, what):
    actual = actual.float()
    expected = expected.float()
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")
    else:
        scale = expected.abs().max().clamp_min(1e-3)
        err = (actual - expected).abs().max()
        assert err <= 4e-2 * scale, f"{what}: max error {err} vs scale {scale} (bf16)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_values_grad_equals_dense_grad_at_indices(shape, bias, kind, backend, dtype):
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(SHAPES.index(shape) * 4 + 2 * bias + (kind == "linear"))
    base = make_base(kind, out_f, in_f, bias, gen, dtype)
    numel = out_f * in_f
    k = max(1, numel // 2)
    idx = random_indices(numel, k, gen)
    layer = SparseDeltaLayer(base, idx, backend=backend)
    assert layer.values.dtype == dtype and layer.indices.dtype == torch.int32
    with torch.no_grad():
        layer.values.copy_(torch.randn(k, generator=gen).to(dtype))
    if bias:
        layer.bias.requires_grad_(True)

    for x_shape in [(6, in_f), (2, 3, in_f)]:
        x = torch.randn(x_shape, generator=gen).to(dtype).requires_grad_(True)
        r = torch.randn(x_shape[:-1] + (out_f,), generator=gen).to(dtype)
        layer.values.grad = None
        if bias:
            layer.bias.grad = None

        y = layer(x)
        assert y.shape == x_shape[:-1] + (out_f,) and y.dtype == dtype
        (y * r).pow(2).sum().backward()

        y_ref, w_ref, b_ref, x_ref = dense_reference(kind, layer.weight, layer.bias, idx, layer.values, x)
        (y_ref * r.float()).pow(2).sum().backward()

        assert_close(y, y_ref, dtype, "output")
        assert layer.values.grad is not None and layer.values.grad.dtype == dtype
        assert_close(layer.values.grad, w_ref.grad.reshape(-1)[idx.long()], dtype, "grad values")
        assert_close(x.grad, x_ref.grad, dtype, "grad x")
        if bias:
            assert_close(layer.bias.grad, b_ref.grad, dtype, "grad bias")
        # the frozen weight never gets a gradient
        assert layer.weight.grad is None and not layer.weight.requires_grad


@pytest.mark.parametrize("backend", ["sampled_addmm", "gather"])
def test_sddmm_matches_dense_product(backend, monkeypatch):
    # a tiny chunk size makes the gather path loop over many chunks
    monkeypatch.setattr(backends, "GATHER_CHUNK_ELEMENTS", 7)
    gen = torch.Generator().manual_seed(1)
    rows, cols, tokens = 9, 6, 5
    a = torch.randn(tokens, rows, generator=gen)
    b = torch.randn(tokens, cols, generator=gen)
    idx = random_indices(rows * cols, 20, gen)
    got = sddmm(a, b, IndexLayout(idx, torch.Size((rows, cols))), backend)
    ref = (a.t() @ b).reshape(-1)[idx.long()]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_sddmm_auto_uses_both_paths(monkeypatch):
    monkeypatch.setenv("SPARSEFT_NATIVE", "0")  # the torch backends' choice (no compiled kernel)
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 5, generator=gen), torch.randn(4, 3, generator=gen)
    idx = random_indices(15, 6, gen)
    layout = IndexLayout(idx, torch.Size((5, 3)))
    ref = (a.t() @ b).reshape(-1)[idx.long()]
    for limit in (0, 1 << 30):  # 0 forces sampled_addmm, huge forces gather
        monkeypatch.setattr(backends, "GATHER_AUTO_LIMIT", limit)
        torch.testing.assert_close(sddmm(a, b, layout, "auto"), ref, rtol=1e-5, atol=1e-5)


def test_auto_backend_cost_model():
    """Gather for few entries per (rows + cols) and small products; sampled_addmm when the
    entries outnumber the transposed features or the products would leave the cache
    (cases from bench/results/quiet/sddmm_backends.json)."""
    assert delta_mod.gather_is_cheaper(2048, 147, 384, 384)
    assert delta_mod.gather_is_cheaper(512, 400, 576, 576)
    assert not delta_mod.gather_is_cheaper(512, 2543, 192, 576)
    assert not delta_mod.gather_is_cheaper(2048, 1475, 384, 384)
    assert not delta_mod.gather_is_cheaper(64, 5000, 384, 384)
    assert not delta_mod.gather_is_cheaper(1 << 20, 4, 10_000, 10_000)  # over GATHER_AUTO_LIMIT


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 4), (4, 2)])
def test_sddmm_of_no_tokens_is_zero(backend, shape, monkeypatch):
    _force_token_blocks(monkeypatch)
    layout = IndexLayout(torch.tensor([0, 3, 5], dtype=torch.int32), torch.Size(shape))
    got = sddmm(torch.randn(0, shape[0]), torch.randn(0, shape[1]), layout, backend)
    assert torch.equal(got, torch.zeros(3))


def test_sddmm_unknown_backend():
    layout = IndexLayout(torch.tensor([0, 1], dtype=torch.int32), torch.Size((2, 2)))
    with pytest.raises(ValueError, match="unknown SDDMM backend"):
        sddmm(torch.randn(3, 2), torch.randn(3, 2), layout, "nope")


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_zero_values_and_empty_index_leave_output_identical(kind):
    gen = torch.Generator().manual_seed(3)
    base = make_base(kind, 6, 4, True, gen)
    x = torch.randn(2, 3, 4, generator=gen)
    expected = base(x)
    layer = SparseDeltaLayer(base)  # empty index
    assert layer.num_entries == 0
    assert torch.equal(layer(x), expected)
    layer.set_indices(random_indices(24, 10, gen))
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_grad_observer_receives_dense_weight_grad(kind):
    gen = torch.Generator().manual_seed(4)
    base = make_base(kind, 5, 3, True, gen)
    idx = random_indices(15, 4, gen)
    layer = SparseDeltaLayer(base, idx)
    seen = []
    layer.grad_observer = seen.append
    x = torch.randn(4, 3, generator=gen)
    layer(x).pow(2).sum().backward()
    y_ref, w_ref, _, _ = dense_reference(kind, layer.weight, layer.bias, idx, layer.values, x)
    y_ref.pow(2).sum().backward()
    assert len(seen) == 1
    assert seen[0].shape == layer.weight.shape
    torch.testing.assert_close(seen[0], w_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_merge_unmerge_bit_exact(kind):
    gen = torch.Generator().manual_seed(5)
    base = make_base(kind, 6, 5, True, gen)
    original = base.weight.detach().clone()
    idx = random_indices(30, 12, gen)
    layer = SparseDeltaLayer(base, idx)
    with torch.no_grad():
        layer.values.copy_(torch.randn(12, generator=gen) * 1e-3)
    x = torch.randn(3, 5, generator=gen)
    sparse_out = layer(x).detach()
    expected_weight = original + layer.delta_weight()
    layer.merge()
    assert layer.merged
    assert torch.equal(layer.weight, expected_weight)
    torch.testing.assert_close(layer(x), sparse_out, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_indices(idx)
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.weight, original)


def test_delta_weight_layout_matches_weight():
    gen = torch.Generator().manual_seed(6)
    for kind in ("linear", "conv1d"):
        base = make_base(kind, 4, 3, False, gen)
        idx = torch.tensor([0, 5, 11], dtype=torch.int32)
        layer = SparseDeltaLayer(base, idx)
        with torch.no_grad():
            layer.values.copy_(torch.tensor([1.0, 2.0, 3.0]))
        d = layer.delta_weight()
        assert d.shape == layer.weight.shape
        assert d.reshape(-1)[[0, 5, 11]].tolist() == [1.0, 2.0, 3.0]
        assert int((d != 0).sum()) == 3


def test_set_indices_keeps_parameter_object():
    gen = torch.Generator().manual_seed(7)
    layer = SparseDeltaLayer(make_base("linear", 4, 4, False, gen))
    param = layer.values
    layer.set_indices(torch.tensor([1, 3, 9], dtype=torch.int32), torch.tensor([0.5, -1.0, 2.0]))
    assert layer.values is param
    assert layer.values.tolist() == [0.5, -1.0, 2.0]
    assert layer.indices.tolist() == [1, 3, 9]
    with pytest.raises(ValueError, match="values has 2 entries for 3 indices"):
        layer.set_indices(torch.tensor([1, 3, 9], dtype=torch.int32), torch.zeros(2))


@pytest.mark.parametrize(
    "indices, message",
    [
        (torch.tensor([0, 2, 1], dtype=torch.int32), "sorted and unique"),
        (torch.tensor([0, 1, 1], dtype=torch.int32), "sorted and unique"),
        (torch.tensor([0, 12], dtype=torch.int32), "must lie in"),
        (torch.tensor([-1, 3], dtype=torch.int32), "must lie in|outside the int32 range"),
        (torch.tensor([[0, 1]], dtype=torch.int32), "1-D"),
        (torch.tensor([0.0, 1.0]), "must be integers"),
        (torch.tensor([0, 2**31], dtype=torch.int64), "int32 range"),
    ],
    ids=["unsorted", "duplicate", "too-large", "negative", "2d", "float", "int64-overflow"],
)
def test_validate_indices_rejects(indices, message):
    with pytest.raises(ValueError, match=message):
        validate_indices(indices, 12)


def test_validate_indices_accepts_int64_and_returns_int32():
    out = validate_indices(torch.tensor([0, 4, 11]), 12)
    assert out.dtype == torch.int32 and out.tolist() == [0, 4, 11]
    with pytest.raises(TypeError):
        validate_indices([0, 1], 12)


# -- ways of building W + S (weight modes) and the custom-op path (torch.compile) -------------
@pytest.mark.parametrize("use_op", [False, True], ids=["function", "op"])
@pytest.mark.parametrize("mode", list(delta_mod.WEIGHT_MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("density", [0.02, 0.5], ids=["d2pct", "d50pct"])
def test_weight_modes_and_op_match_dense_reference(density, kind, dtype, mode, use_op):
    out_f, in_f = 12, 9
    gen = torch.Generator().manual_seed(11 + (kind == "linear"))
    base = make_base(kind, out_f, in_f, True, gen, dtype)
    original = base.weight.detach().clone()
    version = base.weight._version
    k = max(1, int(density * out_f * in_f))
    idx = random_indices(out_f * in_f, k, gen)
    layer = SparseDeltaLayer(base, idx, weight_mode=mode)
    with torch.no_grad():
        layer.values.copy_(torch.randn(k, generator=gen).to(dtype))
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 5, in_f, generator=gen).to(dtype).requires_grad_(True)
    r = torch.randn(2, 5, out_f, generator=gen).to(dtype)
    y = delta_mod.sparse_delta_linear(x, layer.weight, layer.bias, layer.values, layer.layout, layer.transposed,
                                      layer.backend, mode, use_op=use_op)
    (y * r).pow(2).sum().backward()
    y_ref, w_ref, b_ref, x_ref = dense_reference(kind, layer.weight, layer.bias, idx, layer.values, x)
    (y_ref * r.float()).pow(2).sum().backward()
    assert_close(y, y_ref, dtype, "output")
    assert_close(layer.values.grad, w_ref.grad.reshape(-1)[idx.long()], dtype, "grad values")
    assert_close(x.grad, x_ref.grad, dtype, "grad x")
    assert_close(layer.bias.grad, b_ref.grad, dtype, "grad bias")
    # every mode leaves W as it was, bit for bit, and untouched as far as autograd can tell
    assert torch.equal(layer.weight, original)
    assert layer.weight._version == version and layer.weight.grad is None


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_weight_modes_give_bit_identical_outputs_and_grads(kind):
    gen = torch.Generator().manual_seed(12)
    base = make_base(kind, 40, 24, True, gen)
    idx = random_indices(40 * 24, 30, gen)
    layer = SparseDeltaLayer(base, idx)
    with torch.no_grad():
        layer.values.copy_(torch.randn(30, generator=gen))
    x0 = torch.randn(7, 24, generator=gen)
    results = {}
    for mode in delta_mod.WEIGHT_MODES:
        layer.weight_mode = mode
        layer.values.grad = None
        x = x0.clone().requires_grad_(True)
        y = layer(x)
        y.pow(2).sum().backward()
        results[mode] = (y.detach(), x.grad, layer.values.grad.clone())
    for mode, got in results.items():
        for a, b in zip(got, results["clone"]):
            assert torch.equal(a, b), mode


def test_inplace_mode_restores_weight_when_the_kernel_fails():
    gen = torch.Generator().manual_seed(13)
    base = make_base("linear", 6, 5, False, gen)
    original = base.weight.detach().clone()
    layer = SparseDeltaLayer(base, random_indices(30, 4, gen), weight_mode="inplace")
    with torch.no_grad():
        layer.values.fill_(1.0)

    def boom(w):
        assert not torch.equal(w, original)  # the delta is in W while the kernel runs
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        delta_mod.with_effective_weight(layer.weight, layer.values, layer.layout, "inplace", boom)
    assert torch.equal(layer.weight, original)


def test_weight_mode_resolution():
    w = torch.zeros(10, 10)
    with torch.no_grad():  # as inside an autograd.Function's forward or a plain backward
        assert delta_mod.resolve_weight_mode("auto", w, 1) == "inplace"
        assert delta_mod.resolve_weight_mode("auto", w, 60) == "scratch"
        assert delta_mod.resolve_weight_mode("auto", w, 4) == "inplace"
        assert delta_mod.resolve_weight_mode("auto", w, 5) == "scratch"  # above 4 % of the entries
        assert delta_mod.resolve_weight_mode("auto", w, 12, tiled=True) == "inplace"  # tiles: up to 12 %
        assert delta_mod.resolve_weight_mode("auto", w, 13, tiled=True) == "scratch"
        assert delta_mod.resolve_weight_mode("inplace", w, 100) == "clone"  # a full index
        assert delta_mod.resolve_weight_mode("inplace", w.t(), 3) == "clone"  # not contiguous
    with torch.enable_grad():  # a kernel run with grad mode on (double backward) gets a private copy
        assert delta_mod.resolve_weight_mode("inplace", w, 3) == "clone"
    with pytest.raises(ValueError, match="unknown weight mode"):
        delta_mod.resolve_weight_mode("nope", w, 3)
    with pytest.raises(ValueError, match="unknown weight mode"):
        SparseDeltaLayer(nn.Linear(2, 2), weight_mode="nope")


def test_sddmm_reuses_transpose_buffers_across_shapes():
    """The sampled_addmm backend transposes into reused per-thread buffers: calls of other
    sizes in between (a larger one grows the buffer, a smaller one uses its prefix) must not
    change any result."""
    gen = torch.Generator().manual_seed(14)
    cases = []
    for rows, cols, tokens in [(9, 6, 5), (30, 20, 40), (4, 3, 2), (9, 6, 5)]:
        a = torch.randn(tokens, rows, generator=gen)
        b = torch.randn(tokens, cols, generator=gen)
        idx = random_indices(rows * cols, max(1, rows * cols // 3), gen)
        cases.append((a, b, idx, (rows, cols)))
    delta_mod.release_scratch()
    for a, b, idx, shape in cases + cases[::-1]:
        got = sddmm(a, b, IndexLayout(idx, torch.Size(shape)), "sampled_addmm")
        ref = (a.t() @ b).reshape(-1)[idx.long()]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 1, 3, 1000])
def test_sddmm_token_chunks_match_dense_product(chunk, monkeypatch):
    monkeypatch.setattr(backends, "SDDMM_TOKEN_BLOCK", 0)  # the chunked loop of 2-D calls
    monkeypatch.setattr(backends, "SDDMM_TOKEN_CHUNK", chunk)
    gen = torch.Generator().manual_seed(15)
    a = torch.randn(17, 9, generator=gen)
    b = torch.randn(17, 6, generator=gen)
    idx = random_indices(54, 20, gen)
    got = sddmm(a, b, IndexLayout(idx, torch.Size((9, 6))), "sampled_addmm")
    torch.testing.assert_close(got, (a.t() @ b).reshape(-1)[idx.long()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [1, 2, 4, 5, 16, 1000])
@pytest.mark.parametrize("threads", [1, 2])
def test_sddmm_batched_token_blocks_match_dense_product(block, threads, monkeypatch):
    """One batched sampled_addmm over token blocks (17 tokens: blocks of 4 leave a tail of 1,
    blocks of 5 one of 2) gives the dense product's entries; with one thread the chunked
    loop runs instead, with the same result."""
    monkeypatch.setattr(backends, "SDDMM_TOKEN_BLOCK", block)
    monkeypatch.setattr(backends, "SDDMM_BLOCKS_MIN_THREADS", 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(16)
    a = torch.randn(17, 9, generator=gen, dtype=torch.float64)
    b = torch.randn(17, 6, generator=gen, dtype=torch.float64)
    for n_entries in (1, 20, 54):
        idx = random_indices(54, n_entries, gen)
        got = sddmm(a, b, IndexLayout(idx, torch.Size((9, 6))), "sampled_addmm")
        torch.testing.assert_close(got, (a.t() @ b).reshape(-1)[idx.long()], rtol=1e-12, atol=1e-12)


def _force_token_blocks(monkeypatch, block=4):
    monkeypatch.setattr(backends, "SDDMM_TOKEN_BLOCK", block)
    monkeypatch.setattr(backends, "SDDMM_BLOCKS_MIN_THREADS", 1)
    delta_mod.release_scratch()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layers_sharing_an_input_reorder_it_once_with_exact_grads(kind, dtype, monkeypatch):
    """q/k/v-style layers fed one input: its token-block reordering is done once per backward
    and reused, and each layer's values' gradient still equals the dense reference's. In
    bf16 the operands are upcast to fresh fp32 copies first, which are not shared."""
    _force_token_blocks(monkeypatch)
    copies = []
    real = backends._scratch_flat
    reorder_slots = ("row-blocks", "col-blocks")  # not the compiled kernel's working buffers (tail tokens)
    monkeypatch.setattr(backends, "_scratch_flat",
                        lambda slot, n, like: (slot in reorder_slots and copies.append(slot)) or real(slot, n, like))
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(2, 9, 6, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    layers, refs = [], []
    # Weights with at least as many rows as columns (wider ones solve the transposed problem).
    for out_f in ((7, 7, 9) if kind == "linear" else (4, 4, 6)):
        base = make_base(kind, out_f, 6, True, gen, dtype)
        idx = random_indices(out_f * 6, 10, gen)
        layer = SparseDeltaLayer(base, idx, backend="sampled_addmm")
        with torch.no_grad():
            layer.values.copy_(torch.randn(10, generator=gen, dtype=torch.float64))
        layers.append(layer)
        refs.append(tuple(t.detach().double() for t in (base.weight, base.bias)) + (idx, layer.values.detach().double()))
    h = x * 1.5  # an intermediate, as in a model
    sum(layer(h).double().square().sum() for layer in layers).backward()
    owner_slot = "row-blocks" if kind == "conv1d" else "col-blocks"
    shared = dtype == torch.float64
    assert copies.count(owner_slot) == (1 if shared else 3) and len(copies) == (4 if shared else 6)
    x_ref = x.detach().double().requires_grad_(True)
    h_ref = x_ref * 1.5
    ref_vals = []
    total = 0
    for weight, bias, idx, values in refs:
        v = values.clone().requires_grad_(True)
        w_eff = weight + torch.zeros_like(weight).view(-1).index_put((idx.long(),), v).view_as(weight)
        y = F.linear(h_ref, w_eff, bias) if kind == "linear" else h_ref.matmul(w_eff) + bias
        total = total + y.square().sum()
        ref_vals.append(v)
    total.backward()
    ref_vals = [v.grad for v in ref_vals]
    pairs = [(layer.values.grad, ref, "values' gradient") for layer, ref in zip(layers, ref_vals)]
    for actual, expected, what in pairs + [(x.grad, x_ref.grad, "input gradient")]:
        if shared:
            torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
        else:
            assert_close(actual, expected, dtype, what)  # bf16: relative to the largest entry


@pytest.mark.parametrize("shape", [(3, 11), (5, 6), (1, 9), (6, 5)])
def test_batched_sddmm_of_wide_weights_via_the_transpose(shape, monkeypatch):
    """A weight with fewer rows than columns is solved as its transpose (built once per
    layout) and read back in index order; the values equal the dense product's."""
    _force_token_blocks(monkeypatch, block=3)
    rows, cols = shape
    gen = torch.Generator().manual_seed(20)
    g = torch.randn(13, rows, generator=gen, dtype=torch.float64)
    x = torch.randn(13, cols, generator=gen, dtype=torch.float64)
    layout = IndexLayout(random_indices(rows * cols, max(1, rows * cols // 2), gen), torch.Size(shape))
    ref = (g.t() @ x).reshape(-1)[layout.indices.long()]
    for _ in range(2):
        torch.testing.assert_close(sddmm(g, x, layout, "sampled_addmm"), ref, rtol=1e-12, atol=1e-12)
    assert (layout._transposed is not None) == (rows < cols)
    if rows < cols:
        layout_t, back = layout.transposed()
        assert layout_t.weight_shape == (cols, rows)
        r, c = layout.indices.long() // cols, layout.indices.long() % cols
        assert torch.equal(layout_t.indices.long()[back.long()], c * rows + r)


@pytest.mark.parametrize("batched", [True, False], ids=["blocks-on", "chunks"])
def test_double_backward_through_the_values_gradient(batched, monkeypatch):
    """A second-order pass (differentiating two stacked layers' values' gradients w.r.t. the
    input) takes sampled_addmm with fresh transposes, even where the batched path and the
    reused buffers are on, and matches the dense reference."""
    _force_token_blocks(monkeypatch, block=4 if batched else 0)
    gen = torch.Generator().manual_seed(21)
    bases = [make_base("linear", 6, 6, True, gen, torch.float64) for _ in range(2)]
    idxs = [random_indices(36, 10, gen) for _ in bases]
    vals = [torch.randn(10, generator=gen, dtype=torch.float64) for _ in bases]
    x0 = torch.randn(2, 9, 6, generator=gen, dtype=torch.float64)
    layers = [SparseDeltaLayer(b, i, backend="sampled_addmm") for b, i in zip(bases, idxs)]
    for layer, v in zip(layers, vals):
        with torch.no_grad():
            layer.values.copy_(v)
    x = x0.clone().requires_grad_(True)
    params = [layer.values for layer in layers]
    grads = torch.autograd.grad(layers[1](layers[0](x * 1.5)).square().sum(), params, create_graph=True)
    sum(g.square().sum() for g in grads).backward()
    vs = [v.clone().requires_grad_(True) for v in vals]
    x_ref = x0.clone().requires_grad_(True)
    h = x_ref * 1.5
    for b, i, v in zip(bases, idxs, vs):
        w_eff = b.weight.detach() + torch.zeros(36, dtype=torch.float64).index_put((i.long(),), v).view(6, 6)
        h = F.linear(h, w_eff, b.bias.detach())
    grads_ref = torch.autograd.grad(h.square().sum(), vs, create_graph=True)
    sum(g.square().sum() for g in grads_ref).backward()
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("max_tokens", [1, 4, 7, 100])
def test_batched_sddmm_split_into_bounded_calls(max_tokens, monkeypatch):
    """Long batches go through several batched calls of at most SDDMM_CALL_MAX_TOKENS tokens
    (bounded reorder buffers); the result is the same."""
    _force_token_blocks(monkeypatch, block=2)
    monkeypatch.setattr(backends, "SDDMM_CALL_MAX_TOKENS", max_tokens)
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(17, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(17, 5, generator=gen, dtype=torch.float64)
    layout = IndexLayout(random_indices(30, 12, gen), torch.Size((5, 6)))
    got = sddmm(g, x, layout, "sampled_addmm", col_owner=x)
    torch.testing.assert_close(got, (g.t() @ x).reshape(-1)[layout.indices.long()], rtol=1e-12, atol=1e-12)


def test_shared_reordering_is_redone_after_an_in_place_change(monkeypatch):
    _force_token_blocks(monkeypatch)
    gen = torch.Generator().manual_seed(18)
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    layout = IndexLayout(random_indices(30, 12, gen), torch.Size((5, 6)))
    first = sddmm(g, x, layout, "sampled_addmm", col_owner=x)
    torch.testing.assert_close(first, (g.t() @ x).reshape(-1)[layout.indices.long()])
    x.mul_(-2.0)  # bumps the version: the cached reordering must not be used
    again = sddmm(g, x, layout, "sampled_addmm", col_owner=x)
    torch.testing.assert_close(again, (g.t() @ x).reshape(-1)[layout.indices.long()])
    other = x.clone()  # same values, another owner: no reuse, same result
    torch.testing.assert_close(sddmm(g, other, layout, "sampled_addmm", col_owner=other), again)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_values_grad_with_observer_matches_dense_reference(kind, dtype):
    """With a grad observer the values' gradient is gathered from the dense gradient (no SDDMM);
    it must still equal the dense reference, also when the observer scribbles on its buffer."""
    gen = torch.Generator().manual_seed(16)
    base = make_base(kind, 7, 5, True, gen, dtype)
    idx = random_indices(35, 12, gen)
    layer = SparseDeltaLayer(base, idx)
    with torch.no_grad():
        layer.values.copy_(torch.randn(12, generator=gen).to(dtype))
    layer.grad_observer = lambda g: g.zero_()  # reuses the buffer in place, as scorers do
    x = torch.randn(4, 5, generator=gen).to(dtype).requires_grad_(True)
    layer(x).pow(2).sum().backward()
    y_ref, w_ref, _, x_ref = dense_reference(kind, layer.weight, layer.bias, idx, layer.values, x)
    y_ref.pow(2).sum().backward()
    assert_close(layer.values.grad, w_ref.grad.reshape(-1)[idx.long()], dtype, "grad values")
    assert_close(x.grad, x_ref.grad, dtype, "grad x")
