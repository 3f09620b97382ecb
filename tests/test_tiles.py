"""Tile-structured masks in use: every method chooses and moves whole tiles, tiled layers
train like a dense masked reference (block-sparse values' gradient), save/load/merge."""
from __future__ import annotations

import os

import pytest
import torch

import sparseft
from sparseft.config import CalibrationOptions, ConfigError, DynamicOptions, GrowDropOptions, ID3Options
from sparseft.tiles import is_tiled, select_entries
from sparseft.train import TrainingArguments, train

from conftest import build_bert, build_gpt2, make_batch, toy_batches


def _tiny_bert(seed=0):
    """A one-layer classifier whose weights (32x32, 64x32, 32x64) are whole 16- and 32-tiles."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _tiles_of(model, t):
    """Per layer: whether the index set is whole aligned t-tiles."""
    return {n: is_tiled(l.indices, tuple(l.weight.shape), t) for n, l in model.sparse_layers().items()
            if l.num_entries}


def test_granularity_is_validated_and_saved():
    with pytest.raises(ConfigError, match="granularity"):
        sparseft.SparseConfig(granularity="tile8")
    cfg = sparseft.SparseConfig(granularity="tile32")
    assert sparseft.SparseConfig.from_dict(cfg.to_dict()).granularity == "tile32"


STATIC_SCORERS = ["random", "magnitude", "gradient", "snip", "taylor", "fisher", "grasp", "synflow", "d3"]


@pytest.mark.parametrize("granularity", ["tile16", "tile32"])
@pytest.mark.parametrize("method", STATIC_SCORERS)
def test_every_scorer_chooses_the_best_pooled_tiles(method, granularity):
    t = int(granularity[4:])
    calib = toy_batches(2, batch_size=4)
    cfg = sparseft.SparseConfig(method=method, num_params=3 * t * t, granularity=granularity,
                                calibration=CalibrationOptions(examples=8))
    model = sparseft.get_sparse_model(_tiny_bert(), cfg, calibration_data=calib)
    assert model.num_sparse_params() == 3 * t * t
    assert all(_tiles_of(model, t).values())
    # the same tiles as pooling the entry scorer's own scores by hand
    from sparseft.scoring import compute_scores
    from sparseft.scoring.grasp import grasp_scores

    reference = sparseft.get_sparse_model(_tiny_bert(), sparseft.SparseConfig(method=method, num_params=3 * t * t,
                                                                              calibration=CalibrationOptions(examples=8)),
                                        calibration_data=calib)
    layers = reference.sparse_layers()
    if method == "grasp":
        scores = grasp_scores(layers, model=reference, data=calib, micro_batch=1)
    else:
        scores = compute_scores(method, layers, model=reference, data=calib, seed=0, order="largest",
                                d3_epsilon=1e-3, d3_exponent=0.0, micro_batch=1)
    shapes = {n: tuple(l.weight.shape) for n, l in layers.items()}
    expected = select_entries(scores, shapes, 3 * t * t, "global", granularity)
    for name, layer in model.sparse_layers().items():
        assert torch.equal(layer.indices, expected[name]), name


def _train(model, steps, lr=5e-2):
    return train(model, toy_batches(steps, batch_size=4), TrainingArguments(lr=lr, max_steps=steps, warmup_ratio=0.0,
                                                                           progress=False))


@pytest.mark.parametrize("method, extra", [
    ("gradient", dict(schedule="dynamic", dynamic=DynamicOptions(update_every=2, score_window=1))),
    ("random", dict(schedule="dynamic", dynamic=DynamicOptions(update_every=2, score_window=1, drop_policy="zero"))),
    ("id3", dict(id3=ID3Options(unmask_every=1))),
    ("grow-drop", dict(grow_drop=GrowDropOptions(every=2, fraction=0.5))),
    ("dst", {}),
])
def test_training_time_methods_move_whole_tiles(method, extra):
    t = 16
    cfg = sparseft.SparseConfig(method=method, num_params=4 * t * t, granularity="tile16", **extra)
    model = sparseft.get_sparse_model(_tiny_bert(), cfg, calibration_data=toy_batches(1, batch_size=4))
    seen = []
    inner = model.method.on_step

    def on_step(step, m, optimizer=None, batch=None):
        inner(step, m, optimizer, batch)
        if method != "dst":  # DST trains dense silos and compacts at the end
            assert all(_tiles_of(m, t).values())
            seen.append({n: l.indices.clone() for n, l in m.sparse_layers().items()})

    model.method.on_step = on_step
    _train(model, 6)
    assert all(_tiles_of(model, t).values())
    assert model.num_sparse_params() <= 4 * t * t
    if method in ("id3", "grow-drop") or extra.get("schedule") == "dynamic":
        assert model.num_sparse_params() == 4 * t * t
    if method == "grow-drop":
        assert model.method.swapped and model.method.swapped[0][1] == 2  # round(0.5 * f(2) * 4) tiles
    if method == "id3":
        assert [sum(v.numel() for v in s.values()) // 256 for s in seen] == [1, 2, 3, 4, 4, 4][:len(seen)]


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_tiled_layers_train_like_a_dense_masked_reference(arch):
    """Values' gradient of a tile mask (block path) = the dense weight gradient at the index."""
    base = build_bert(hidden=32) if arch == "bert" else build_gpt2(hidden=32)
    model = sparseft.get_sparse_model(base, sparseft.SparseConfig(method="random", density=0.25, granularity="tile16"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for v in model.sparse_parameters():
            v.copy_(torch.randn(v.shape, generator=gen) * 0.05)
    tiled = [l.layout.tiles is not None for l in model.sparse_layers().values() if l.num_entries]
    assert tiled and all(tiled)
    batch = make_batch()
    out = model(**batch).logits
    out.pow(2).mean().backward()
    # reference: the merged dense weights with requires_grad
    ref = build_bert(hidden=32) if arch == "bert" else build_gpt2(hidden=32)
    layers = model.sparse_layers()
    with torch.no_grad():
        for name, layer in layers.items():
            w = ref.get_submodule(name).weight
            w.view(-1).index_add_(0, layer.indices, layer.values)
    for p in ref.parameters():
        p.requires_grad_(False)
    for name in layers:
        ref.get_submodule(name).weight.requires_grad_(True)
    ref_out = ref(**batch).logits
    assert torch.allclose(out, ref_out, atol=1e-5)
    ref_out.pow(2).mean().backward()
    for name, layer in layers.items():
        expected = ref.get_submodule(name).weight.grad.reshape(-1)[layer.indices.long()]
        assert torch.allclose(layer.values.grad, expected, atol=1e-6, rtol=1e-4), name


def test_tile_adapter_saves_loads_and_merges(tmp_path):
    model = sparseft.get_sparse_model(_tiny_bert(), sparseft.SparseConfig(method="magnitude", num_params=1024,
                                                                          granularity="tile32"))
    _train(model, 3)
    model.save_pretrained(tmp_path)
    loaded = sparseft.SparseModel.from_pretrained(_tiny_bert(), tmp_path)
    assert loaded.sparse_config.granularity == "tile32"
    batch = toy_batches(1, batch_size=4)[0]
    model.eval(), loaded.eval()
    with torch.no_grad():
        a = model(**batch).logits
        b = loaded(**batch).logits
        merged = loaded.merge_and_unload()(**batch).logits
    assert torch.equal(a, b)
    assert torch.allclose(a, merged, atol=1e-5)


@pytest.mark.parametrize("backend, mode", [
    ("aot_eager", None),
    pytest.param("inductor", "reduce-overhead", marks=pytest.mark.skipif(
        not os.environ.get("SPARSEFT_TEST_INDUCTOR"), reason="slow (C++ compilation); set SPARSEFT_TEST_INDUCTOR=1")),
])
def test_tile_masks_compile_to_one_graph_and_train_like_eager(backend, mode):
    """A static tile mask's step compiles without graph breaks (the capture CUDA graphs need
    on a GPU: ``mode="reduce-overhead"``); the packed optimizer step follows it."""
    import copy

    torch._dynamo.reset()
    model = sparseft.get_sparse_model(build_bert(hidden=32), sparseft.SparseConfig(method="random", density=0.25,
                                                                                 granularity="tile16"))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend, mode=mode, fullgraph=True)
    opts = [sparseft.create_optimizer(m, lr=1e-2) for m in (model, eager)]
    batch = make_batch()
    for _ in range(3):
        losses = []
        for m, opt in zip((compiled, eager), opts):
            loss = m(**batch).logits.pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(model.sparse_parameters(), eager.sparse_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
