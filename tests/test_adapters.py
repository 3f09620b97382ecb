"""Several named adapters on one base: load, switch, delete, and combine by exact sparse
addition, checked against dense references (W0 + sum_i w_i S_i)."""
import pytest
import torch

import sparseft
from conftest import build_bert, make_batch, tiny_one_layer_bert, toy_batches
from sparseft.model import AdapterError, SparseModel
from sparseft.train import TrainingArguments, train


def saved_adapter(path, seed, builder=build_bert, **cfg):
    model = sparseft.get_sparse_model(builder(), sparseft.SparseConfig(**{"density": 0.05, "seed": seed, **cfg}))
    gen = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.values.copy_(torch.randn(layer.values.shape, generator=gen) * 0.1)
    model.save_pretrained(path)
    return model.eval()


def folded_adapter(path, seed):
    """A dynamic run with drop_policy='merge': part of its delta lives in the base weights."""
    model = sparseft.get_sparse_model(tiny_one_layer_bert(0), sparseft.SparseConfig(
        method="gradient", density=0.05, seed=seed, schedule="dynamic", dynamic=dict(update_every=2, score_window=1, drop_policy="merge")), calibration_data=toy_batches(1, seed=seed))
    train(model, toy_batches(4, seed=seed), TrainingArguments(lr=5e-2, max_steps=4, warmup_ratio=0.0, progress=False))
    assert model.num_folded_params() > 0
    # the pristine head, so that adapters of different seeds carry the same one (combinable)
    model.model.classifier.load_state_dict(tiny_one_layer_bert(0).classifier.state_dict())
    model.save_pretrained(path)
    return model.eval()


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def effective_delta(model, pristine):
    """Dense W_eff - W0 per targeted layer (folded entries included)."""
    return {n: (l.weight + l.delta_weight()).double() - pristine.get_submodule(n).weight.double()
            for n, l in model.sparse_layers().items()}


def test_load_set_and_delete_adapters(tmp_path):
    a = saved_adapter(tmp_path / "a", seed=0)
    b = saved_adapter(tmp_path / "b", seed=1)
    assert any(not torch.equal(la.indices, lb.indices) for la, lb in zip(a.sparse_layers().values(),
                                                                          b.sparse_layers().values()))
    batch = make_batch()
    model = SparseModel.from_pretrained(build_bert(), tmp_path / "a")
    model.load_adapter(tmp_path / "b", "b")
    assert model.adapter_names == ["default", "b"] and model.active_adapter == "default"
    assert torch.equal(logits(model, batch), logits(a, batch))  # loading does not activate
    model.set_adapter("b")
    assert model.active_adapter == "b" and model.adapter_names == ["b", "default"]
    assert torch.equal(logits(model, batch), logits(b, batch))
    model.set_adapter("default")
    assert torch.equal(logits(model, batch), logits(a, batch))
    with pytest.raises(ValueError, match="no adapter named"):
        model.set_adapter("c")
    model.delete_adapter("default")  # the active one: "b" takes over
    assert model.adapter_names == ["b"] and torch.equal(logits(model, batch), logits(b, batch))
    with pytest.raises(ValueError, match="only adapter"):
        model.delete_adapter("b")


def test_switching_adapters_with_folded_entries_restores_the_base_exactly(tmp_path):
    a = folded_adapter(tmp_path / "a", seed=0)
    b = folded_adapter(tmp_path / "b", seed=1)
    batch = toy_batches(1, seed=5)[0]
    model = SparseModel.from_pretrained(tiny_one_layer_bert(0), tmp_path / "a")
    model.load_adapter(tmp_path / "b", "b")
    model.set_adapter("b")
    assert torch.equal(logits(model, batch), logits(b, batch))
    for (n, layer), ref in zip(model.sparse_layers().items(), b.sparse_layers().values()):
        assert torch.equal(layer.weight, ref.weight), n  # a's folds undone, b's applied
    model.set_adapter("default")
    assert torch.equal(logits(model, batch), logits(a, batch))
    pristine = tiny_one_layer_bert(0)
    with model.disable_adapter():
        for n, layer in model.sparse_layers().items():
            assert torch.equal(layer.weight, pristine.get_submodule(n).weight), n


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.7, -0.3], [0.5, 0.0]])
def test_weighted_adapter_is_the_exact_weighted_sum(tmp_path, weights):
    a = saved_adapter(tmp_path / "a", seed=0)
    b = saved_adapter(tmp_path / "b", seed=1)
    model = SparseModel.from_pretrained(build_bert(), tmp_path / "a")
    model.load_adapter(tmp_path / "b", "b")
    model.add_weighted_adapter(["default", "b"], weights, "mix")
    assert model.active_adapter == "default"
    model.set_adapter("mix")
    pristine = build_bert()
    da, db = effective_delta(a, pristine), effective_delta(b, pristine)
    dense = build_bert()
    for name, layer in model.sparse_layers().items():
        want = weights[0] * da[name] + weights[1] * db[name]
        union = torch.unique(torch.cat([a.sparse_layers()[name].indices, b.sparse_layers()[name].indices]))
        assert torch.equal(layer.indices, union.to(torch.int32))
        torch.testing.assert_close(layer.delta_weight().double(), want, rtol=0, atol=1e-7)
        with torch.no_grad():
            dense.get_submodule(name).weight.copy_((pristine.get_submodule(name).weight.double() + want).float())
    batch = make_batch()
    torch.testing.assert_close(logits(model, batch), logits(dense.eval(), batch), rtol=1e-5, atol=1e-6)


def test_weighted_adapter_counts_folded_entries(tmp_path):
    a = folded_adapter(tmp_path / "a", seed=0)
    b = folded_adapter(tmp_path / "b", seed=1)
    model = SparseModel.from_pretrained(tiny_one_layer_bert(0), tmp_path / "a")
    model.load_adapter(tmp_path / "b", "b")
    model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mean")
    model.set_adapter("mean")
    pristine = tiny_one_layer_bert(0)
    da, db = effective_delta(a, pristine), effective_delta(b, pristine)
    for name, layer in model.sparse_layers().items():
        assert layer.num_folded == 0
        torch.testing.assert_close(layer.weight.double(), pristine.get_submodule(name).weight.double(), rtol=0, atol=0)
        torch.testing.assert_close(layer.delta_weight().double(), 0.5 * da[name] + 0.5 * db[name], rtol=0, atol=1e-7)


def test_adapters_must_target_the_same_modules(tmp_path):
    saved_adapter(tmp_path / "a", seed=0)
    saved_adapter(tmp_path / "q", seed=0, target_modules=["query"])
    model = SparseModel.from_pretrained(build_bert(), tmp_path / "a")
    with pytest.raises(AdapterError, match="same modules"):
        model.load_adapter(tmp_path / "q", "q")
    with pytest.raises(ValueError, match="already loaded"):
        model.load_adapter(tmp_path / "a", "default")


def test_weighted_adapter_refuses_different_task_heads(tmp_path):
    saved_adapter(tmp_path / "a", seed=0)
    b = saved_adapter(tmp_path / "b", seed=1)
    with torch.no_grad():
        b.model.classifier.weight.add_(1.0)
    b.save_pretrained(tmp_path / "b")
    model = SparseModel.from_pretrained(build_bert(), tmp_path / "a")
    model.load_adapter(tmp_path / "b", "b")
    with pytest.raises(ValueError, match="different task heads"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix")
