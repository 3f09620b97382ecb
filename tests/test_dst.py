"""Dynamic Subset Tuning: the per-silo projection, its ends (tiny and full density), export."""
from __future__ import annotations

import math

import pytest
import torch

import sparseft
from conftest import tiny_one_layer_bert as tiny_bert
from conftest import toy_batches
from sparseft.methods.dst import project_topk_
from sparseft.model import SparseModel
from sparseft.optim import SparseAdamW
from sparseft.train import SparseController, TrainingArguments, train


def dst_model(**budget):
    return sparseft.get_sparse_model(tiny_bert(), sparseft.SparseConfig(method="dst", **budget))


def test_project_keeps_the_k_largest_magnitudes_ties_to_the_lower_index():
    delta = torch.tensor([0.5, -2.0, 1.0, -1.0, 1.0, 0.1])
    keep = project_topk_(delta, 3)
    assert keep.tolist() == [False, True, True, True, False, False]
    assert delta.tolist() == [0.0, -2.0, 1.0, -1.0, 0.0, 0.0]
    d = torch.randn(10)
    assert bool(project_topk_(d.clone(), 10).all()) and not bool(project_topk_(d, 0).any()) and bool((d == 0).all())


@pytest.mark.parametrize("density", [0.05, 0.3])
def test_after_every_step_at_most_k_entries_differ_and_they_are_the_largest(density):
    model = dst_model(density=density)
    method = model.method
    layers = model.sparse_layers()
    sizes = {n: l.weight.numel() for n, l in layers.items()}
    assert sum(method.shares.values()) == method.budget == round(density * sum(sizes.values()))
    for n, k in method.shares.items():
        assert math.floor(density * sizes[n]) - 1 <= k <= math.ceil(density * sizes[n])
    base = {n: l.weight.detach().clone() for n, l in layers.items()}
    before = {}
    inner = method.project

    def project(m):
        before.update({n: l.values.detach().clone() for n, l in layers.items()})
        kept_tiles = inner(m)
        for n, l in layers.items():
            k = method.shares[n]
            theta = l.weight + l.delta_weight()
            differs = (theta != base[n]).reshape(-1)
            assert int(differs.sum()) <= k
            # the kept entries are exactly the k largest |theta' - theta0| before projection
            mag = before[n].abs()
            order = sorted(range(mag.numel()), key=lambda i: (-float(mag[i]), i))[:k]
            kept = torch.zeros_like(differs)
            kept[order] = True
            assert torch.equal(l.values.detach() != 0, kept & (before[n] != 0))
            assert torch.equal(l.values.detach()[kept], before[n][kept])
            # the others are back to pretrained exactly
            assert torch.equal(theta.reshape(-1)[~kept], base[n].reshape(-1)[~kept])
        project.calls += 1
        return kept_tiles

    project.calls = 0
    method.project = project
    train(model, toy_batches(6), TrainingArguments(lr=1e-2, max_steps=6, warmup_ratio=0.0, progress=False))
    assert project.calls >= 6
    # compacted to the sparse form: only entries that differ from pretrained are indexed
    assert model.num_sparse_params() <= method.budget
    for l in layers.values():
        assert bool((l.values.detach() != 0).all())


def test_density_one_is_full_fine_tuning_step_for_step():
    sparse = dst_model(density=1.0)
    dense = tiny_bert()
    targets = sparse.target_names
    for p in dense.parameters():
        p.requires_grad_(False)
    for n in targets:
        dense.get_submodule(n).weight.requires_grad_(True)
    for p in dense.classifier.parameters():
        p.requires_grad_(True)
    lr = 1e-3
    opt_s = sparseft.create_optimizer(sparse, lr)
    opt_d = torch.optim.AdamW([{"params": [dense.get_submodule(n).weight for n in targets], "weight_decay": 0.0},
                               {"params": list(dense.classifier.parameters()), "weight_decay": 0.0}], lr=lr)
    ctl = SparseController(sparse, opt_s)
    ctl.train_begin(5)
    for step, batch in enumerate(toy_batches(5), start=1):
        with ctl.step(opt_s, batch):
            loss_s = sparse(**batch).loss
            loss_s.backward()
        loss_d = dense(**batch).loss
        loss_d.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        torch.testing.assert_close(loss_s, loss_d, rtol=1e-5, atol=1e-6)
        for n in targets:
            layer = sparse.get_submodule(f"model.{n}")
            torch.testing.assert_close(layer.weight + layer.delta_weight(), dense.get_submodule(n).weight,
                                       rtol=1e-5, atol=1e-6)
    ctl.train_end(opt_s)
    assert sparse.num_sparse_params() == sum(sparse.get_submodule(f"model.{n}").weight.numel() for n in targets)


@pytest.mark.parametrize("budget", [{"density": 1e-7}, {"num_params": 3}])
def test_tiny_budgets_train_a_handful_of_entries_and_save_sparse(budget, tmp_path):
    model = dst_model(**budget)
    assert model.method.budget == max(1, budget.get("num_params", 1))
    result = train(model, toy_batches(4), TrainingArguments(lr=1e-2, max_steps=4, warmup_ratio=0.0, progress=False))
    assert 1 <= model.num_sparse_params() <= model.method.budget
    # every entry got an update at every step while training: reported honestly
    assert result.mean_active_entries == model.num_targeted_weights()
    model.save_pretrained(tmp_path / "a")
    batch = toy_batches(1, seed=5)[0]
    with torch.no_grad():
        want = model(**batch).logits
        loaded = SparseModel.from_pretrained(tiny_bert(), tmp_path / "a")
        got = loaded(**batch).logits
    assert loaded.num_sparse_params() == model.num_sparse_params()
    torch.testing.assert_close(got, want)
