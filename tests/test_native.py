"""The compiled CPU SDDMM kernel (sparseft.native) against the dense product, its build and fallbacks."""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

from sparseft import native
from sparseft.delta import IndexLayout, SparseDeltaLayer, sddmm

needs_kernel = pytest.mark.skipif(not native.available(), reason="no C compiler: the kernel is not built")


def random_layout(rows: int, cols: int, k: int, gen: torch.Generator) -> IndexLayout:
    idx = torch.randperm(rows * cols, generator=gen)[:k].sort().values.to(torch.int32)
    return IndexLayout(idx, torch.Size((rows, cols)))


def dense_entries(g: torch.Tensor, x: torch.Tensor, layout: IndexLayout) -> torch.Tensor:
    return (g.double().t() @ x.double()).reshape(-1)[layout.indices.long()]


@needs_kernel
@pytest.mark.parametrize("rows,cols,tokens,k", [
    (9, 6, 5, 20), (1, 16, 70, 7), (16, 1, 70, 9), (13, 13, 64, 169), (40, 17, 129, 300),
    (3, 700, 200, 500), (700, 3, 1, 40), (64, 64, 1000, 1),
])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_matches_dense_product(rows, cols, tokens, k, threads, monkeypatch):
    """Token counts that are and are not multiples of the kernel's block, fewer tokens than
    threads, widths that are and are not multiples of its 8 x 8 tiles, one entry and all."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(rows * 1000 + cols + tokens)
    layout = random_layout(rows, cols, min(k, rows * cols), gen)
    g, x = torch.randn(tokens, rows, generator=gen), torch.randn(tokens, cols, generator=gen)
    got = sddmm(g, x, layout, "native")
    assert got.dtype == torch.float32 and got.shape == (layout.numel,)
    torch.testing.assert_close(got.double(), dense_entries(g, x, layout), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_kernel_reads_strided_and_transposed_factors():
    """A factor whose rows are spaced wider than its width (a column slice of a bigger
    tensor) is read in place; a feature-major one is made token-major first."""
    gen = torch.Generator().manual_seed(3)
    layout = random_layout(12, 10, 50, gen)
    g_big = torch.randn(100, 20, generator=gen)
    g = g_big[:, 3:15]
    x = torch.randn(10, 100, generator=gen).t()
    assert not g.is_contiguous() and not x.is_contiguous()
    torch.testing.assert_close(sddmm(g, x, layout, "native").double(), dense_entries(g, x, layout),
                               rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_upcasts_half_precision(dtype):
    gen = torch.Generator().manual_seed(4)
    layout = random_layout(8, 8, 30, gen)
    g, x = torch.randn(50, 8, generator=gen).to(dtype), torch.randn(50, 8, generator=gen).to(dtype)
    got = sddmm(g, x, layout, "native")
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), dense_entries(g, x, layout).to(dtype).double(), rtol=2e-2, atol=5e-2)


@needs_kernel
def test_kernel_of_no_tokens_is_zero():
    layout = IndexLayout(torch.tensor([0, 3, 5], dtype=torch.int32), torch.Size((2, 4)))
    assert torch.equal(sddmm(torch.randn(0, 2), torch.randn(0, 4), layout, "native"), torch.zeros(3))


@needs_kernel
def test_auto_takes_the_kernel_for_fp32_on_cpu(monkeypatch):
    calls = []
    real = native.sddmm
    monkeypatch.setattr(native, "sddmm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    gen = torch.Generator().manual_seed(5)
    layout = random_layout(64, 64, 800, gen)
    g, x = torch.randn(256, 64, generator=gen), torch.randn(256, 64, generator=gen)
    sddmm(g, x, layout, "auto")
    assert calls == [1]
    sddmm(g.double(), x.double(), layout, "auto")  # fp64: torch's sampled_addmm
    assert calls == [1]
    few = random_layout(64, 64, 12, gen)  # under a tenth of rows + cols: gather reads less
    torch.testing.assert_close(sddmm(g, x, few, "auto").double(), dense_entries(g, x, few), rtol=1e-4, atol=1e-4)
    assert calls == [1]


@needs_kernel
def test_training_layer_with_the_kernel_matches_dense_reference():
    """A layer's values' gradient through the autograd function, native versus the dense
    weight gradient read at the index."""
    gen = torch.Generator().manual_seed(6)
    base = torch.nn.Linear(24, 40)
    idx = torch.randperm(960, generator=gen)[:100].sort().values.int()
    layer = SparseDeltaLayer(base, idx, backend="native")
    with torch.no_grad():
        layer.values.normal_(generator=gen)
    x = torch.randn(3, 70, 24, generator=gen, requires_grad=True)
    layer(x).square().sum().backward()
    w = (base.weight.detach().clone().view(-1).index_add(0, idx.long(), layer.values.detach())).view(40, 24)
    w.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x_ref, w, base.bias.detach()).square().sum().backward()
    torch.testing.assert_close(layer.values.grad, w.grad.view(-1)[idx.long()], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_kernel_shares_torchs_openmp_runtime():
    """The kernel's parallel regions must run on torch's thread pool, not a second OpenMP
    runtime competing for the same cores."""
    native.library()
    with open("/proc/self/maps") as fh:
        gomps = {line.split()[-1] for line in fh if "libgomp" in line}
    assert len(gomps) <= 1, gomps


def test_kernel_off_falls_back_to_torch(monkeypatch):
    monkeypatch.setenv("SPARSEFT_NATIVE", "0")
    assert native.library() is None and not native.available()
    gen = torch.Generator().manual_seed(7)
    layout = random_layout(30, 20, 200, gen)
    g, x = torch.randn(90, 30, generator=gen), torch.randn(90, 20, generator=gen)
    torch.testing.assert_close(sddmm(g, x, layout, "auto").double(), dense_entries(g, x, layout), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="native.*unavailable"):
        sddmm(g, x, layout, "native")


def test_bad_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("SPARSEFT_NATIVE", "maybe")
    with pytest.raises(ValueError, match="SPARSEFT_NATIVE"):
        native.library()


@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path):
    """An empty build cache and no loaded kernel; the real state comes back afterwards."""
    saved = dict(native._state)
    native.reset()
    monkeypatch.setenv("SPARSEFT_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache" / "native"
    native.reset()
    native._state.update(saved)


def test_failed_build_warns_once_and_falls_back(fresh_kernel_state, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("SPARSEFT_NATIVE", "auto")
    with pytest.warns(RuntimeWarning, match="compiled CPU SDDMM is unavailable"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None  # said once
    gen = torch.Generator().manual_seed(8)
    layout = random_layout(10, 10, 40, gen)
    g, x = torch.randn(20, 10, generator=gen), torch.randn(20, 10, generator=gen)
    torch.testing.assert_close(sddmm(g, x, layout, "auto").double(), dense_entries(g, x, layout), rtol=1e-4, atol=1e-4)
    assert not any(p.suffix == ".so" for p in fresh_kernel_state.glob("*"))  # no half-built file left


def test_required_kernel_that_cannot_build_is_an_error(fresh_kernel_state, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-sparseft")
    monkeypatch.setenv("SPARSEFT_NATIVE", "1")
    with pytest.raises(native.NativeBuildError, match="no working C compiler"):
        native.library()


@needs_kernel
def test_build_is_cached(fresh_kernel_state):
    first = native._build(native.compiler())
    stamp = os.stat(first).st_mtime_ns
    assert first.parent == fresh_kernel_state and first.suffix == ".so"
    assert native._build(native.compiler()) == first and os.stat(first).st_mtime_ns == stamp
    assert native.library() is not None


@needs_kernel
def test_compile_errors_are_reported(fresh_kernel_state, monkeypatch, tmp_path):
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C;\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    monkeypatch.setenv("SPARSEFT_NATIVE", "1")
    with pytest.raises(native.NativeBuildError, match="building the CPU SDDMM kernel failed"):
        native.library()


@needs_kernel
def test_kernel_refuses_arguments_it_would_read_out_of_bounds():
    layout = IndexLayout(torch.tensor([0, 3, 5], dtype=torch.int32), torch.Size((2, 4)))
    lib = native.library()
    g, x = torch.randn(5, 2), torch.randn(5, 4)
    with pytest.raises(ValueError, match="int32"):
        native.sddmm(g, x, layout.crow.long(), layout.col, (2, 4), lib)
    with pytest.raises(ValueError, match="do not fit"):
        native.sddmm(g, torch.randn(5, 3), layout.crow, layout.col, (2, 4), lib)


@needs_kernel
@pytest.mark.parametrize("flags", [native.FLAG_SETS[-1], ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=c11"]],
                         ids=["portable-no-openmp", "portable-openmp"])
def test_portable_builds_match_dense_product(flags, tmp_path, monkeypatch):
    """The kernel as built where -march=native or OpenMP is missing: the portable C loops
    (no AVX) on one thread or on OpenMP's."""
    import subprocess

    target = tmp_path / "sddmm.so"
    subprocess.run([*native.compiler(), *flags, str(native.SOURCE), "-o", str(target)], check=True)
    lib = native._load(target)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    gen = torch.Generator().manual_seed(9)
    for rows, cols, tokens in [(13, 21, 70), (40, 8, 129)]:
        layout = random_layout(rows, cols, rows * cols // 3, gen)
        g, x = torch.randn(tokens, rows, generator=gen), torch.randn(tokens, cols, generator=gen)
        got = native.sddmm(g, x, layout.crow, layout.col, (rows, cols), lib)
        torch.testing.assert_close(got.double(), dense_entries(g, x, layout), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_unusable_cache_builds_in_a_temp_folder(fresh_kernel_state, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SPARSEFT_CACHE", str(blocker / "cache"))  # cannot be created, even by root
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    built = native._build(native.compiler())
    assert built.parent.parent == tmp_path / "tmp" and built.parent.name.startswith("sparseft-native-")
    assert native._build(native.compiler()) == built  # found there next time


@needs_kernel
def test_training_with_the_kernel_follows_the_torch_path(gpt2_factory, monkeypatch):
    """A few SparseAdamW steps of a tiny GPT-2 (Conv1D layers, padding) give the same
    losses and values with the compiled kernel as with torch's SDDMM."""
    from conftest import make_batch

    from sparseft import SparseConfig, create_optimizer, get_sparse_model

    def run(native_setting: str) -> tuple[list[float], list[torch.Tensor]]:
        monkeypatch.setenv("SPARSEFT_NATIVE", native_setting)
        model = get_sparse_model(gpt2_factory(), SparseConfig(density=0.05, seed=3))
        opt = create_optimizer(model, lr=1e-2)
        losses = []
        for step in range(4):
            batch = make_batch(batch=9, seq=16, seed=step)  # more tokens than a kernel block
            loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, [p.detach().clone() for p in model.sparse_parameters()]

    calls = []
    real = native.sddmm
    monkeypatch.setattr(native, "sddmm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    losses_native, values_native = run("auto")
    assert calls, "the kernel did not run"
    calls.clear()
    losses_torch, values_torch = run("0")
    assert not calls
    assert losses_native == pytest.approx(losses_torch, rel=1e-5)
    for a, b in zip(values_native, values_torch):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_a_temp_folder_others_can_write_is_not_trusted(fresh_kernel_state, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SPARSEFT_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    shared = native._temp_dir()
    shared.mkdir(parents=True)
    shared.chmod(0o777)  # as another user could have left it
    with pytest.raises(native.NativeBuildError, match="no writable folder"):
        native._build(native.compiler())
