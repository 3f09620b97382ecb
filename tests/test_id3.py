"""ID3: the unmasking schedule, growth in place, d3 selection and per-entry Adam state."""
from __future__ import annotations

import math

import pytest
import torch

import sparseft
from conftest import tiny_one_layer_bert as tiny_bert
from conftest import RowsDataset, rows_of, toy_batches
from sparseft.config import ID3Options
from sparseft.methods.id3 import d3_score, unmask_schedule
from sparseft.optim import SparseAdamW
from sparseft.select import select_topk
from sparseft.train import SparseController, TrainingArguments, train


def id3_model(num_params=50, **kw):
    """ID3 unmasking at every step (K = 1) unless the test says otherwise: these tests check each event."""
    kw.setdefault("id3", ID3Options(unmask_every=1))
    return sparseft.get_sparse_model(tiny_bert(), sparseft.SparseConfig(method="id3", num_params=num_params, **kw))


def test_id3_unmasks_every_fourth_step_by_default():
    assert sparseft.SparseConfig(method="id3", num_params=10).id3.unmask_every == 4


@pytest.mark.parametrize("total,budget,every", [(10, 50, 1), (7, 3, 1), (10, 50, 3), (5, 5, 5), (1, 9, 1), (12, 100, 4)])
def test_schedule_sums_to_the_budget_with_the_remainder_first(total, budget, every):
    counts = unmask_schedule(total, budget, every)
    assert len(counts) == total and sum(counts) == budget
    events = [i for i in range(total) if i % every == 0]
    assert all(counts[i] == 0 for i in range(total) if i not in events)
    per_event = [counts[i] for i in events]
    assert per_event == sorted(per_event, reverse=True) and max(per_event) - min(per_event) <= 1
    assert min(per_event) == budget // math.ceil(total / every)


def record_steps(model):
    """Snapshot the index sets right after every optimizer step."""
    snaps = []
    method = model.method
    inner = method.on_step

    def on_step(step, m, optimizer=None, batch=None):
        inner(step, m, optimizer, batch)
        snaps.append((step, {n: l.indices.clone() for n, l in m.sparse_layers().items()}))

    method.on_step = on_step
    return snaps


def test_active_entries_follow_the_schedule_never_disappear_and_end_at_the_budget():
    budget, total = 53, 10
    model = id3_model(num_params=budget)
    assert model.num_sparse_params() == 0
    snaps = record_steps(model)
    args = TrainingArguments(lr=1e-2, max_steps=total, warmup_ratio=0.0, progress=False)
    result = train(model, toy_batches(total), args)
    expected = list(torch.tensor(unmask_schedule(total, budget)).cumsum(0).tolist())
    assert [sum(s.numel() for s in sets.values()) for _, sets in snaps] == expected
    assert expected[0] == budget // total + 1 and expected[-1] == budget
    for (_, before), (_, after) in zip(snaps, snaps[1:]):
        for name in before:
            assert bool(torch.isin(before[name], after[name]).all()), name
    assert model.num_sparse_params() == budget
    assert result.mean_active_entries == pytest.approx(sum(expected) / total)
    # about B/2: B(T+1)/(2T) for an even split, a little more with the remainder up front
    assert budget / 2 < result.mean_active_entries <= budget * (total + 1) / (2 * total) + budget / total


def test_unmask_every_k_keeps_the_total_and_grows_only_on_events():
    budget, total, every = 40, 10, 3
    model = id3_model(num_params=budget, id3=ID3Options(unmask_every=every))
    snaps = record_steps(model)
    train(model, toy_batches(total), TrainingArguments(lr=1e-2, max_steps=total, warmup_ratio=0.0, progress=False))
    counts = [sum(s.numel() for s in sets.values()) for _, sets in snaps]
    assert counts == [10, 10, 10, 20, 20, 20, 30, 30, 30, 40]


def run_steps(model, batches, optimizer, total, inspect=None):
    """The loop of sparseft.train, spelled out (no clipping, constant rate); ``inspect(step)``
    runs with the gradients in, before the optimizer step, and may return a check to run
    after it."""
    controller = SparseController(model, optimizer)
    controller.train_begin(total)
    for step, batch in enumerate(batches[:total], start=1):
        controller.before_optimizer_step(step)
        model(**batch).loss.backward()
        controller.before_update(step)
        after = inspect(step) if inspect else None
        optimizer.step()
        if after:
            after()
        optimizer.zero_grad(set_to_none=True)
        controller.after_optimizer_step(step, batch)
    controller.train_end()
    return controller


def test_first_update_of_a_new_entry_has_fresh_adam_bias_correction():
    budget, total, lr = 40, 5, 1e-2
    model = id3_model(num_params=budget)
    opt = SparseAdamW(model.sparse_parameters(), lr=lr)
    prev = {n: l.indices.clone() for n, l in model.sparse_layers().items()}
    checked = []

    def inspect(step):
        new = {}
        for name, layer in model.sparse_layers().items():
            mask = ~torch.isin(layer.indices, prev[name])
            new[name] = (layer.indices[mask].clone(), layer.values.grad[mask].clone())
            prev[name] = layer.indices.clone()

        def after():
            for name, (idx, grads) in new.items():
                layer = model.sparse_layers()[name]
                pos = torch.searchsorted(layer.indices, idx)
                steps = opt.state[layer.values]["step"].expand(layer.values.shape)  # 0-dim while all agree
                assert bool((steps[pos] == 1).all())  # a per-entry count: 1, whatever the global step
                older = torch.ones_like(steps, dtype=torch.bool)
                older[pos] = False
                assert bool((steps[older] > 1).all())  # entries unmasked at earlier steps
                for value, grad in zip(layer.values.detach()[pos], grads):
                    ref = torch.nn.Parameter(torch.zeros(1))
                    ref.grad = grad.reshape(1).clone()
                    torch.optim.AdamW([ref], lr=lr, weight_decay=0.0).step()  # a fresh Adam on that scalar
                    assert float(value) == pytest.approx(float(ref.detach()), rel=1e-6, abs=1e-12)
                    checked.append(step)
        return after

    run_steps(model, toy_batches(total), opt, total, inspect)
    assert len(checked) == budget and set(checked) == set(range(1, total + 1))


def test_new_entries_are_the_top_d3_of_the_dense_gradient_and_get_it():
    budget, total, exponent, eps = 30, 3, 1.0, 1e-2
    model = id3_model(num_params=budget, id3=ID3Options(d3_exponent=exponent, d3_epsilon=eps))
    ref = tiny_bert()  # the same weights, trained densely only to read the gradient
    batches = toy_batches(total)
    ref(**batches[0]).loss.backward()
    names = model.target_names
    dense = {n: ref.get_submodule(n).weight for n in names}
    expected = select_topk({n: d3_score(w.grad, w, eps, exponent) for n, w in dense.items()}, budget, "global")
    # d3 with e=1 is not |g|: the choice must differ from plain gradient magnitude here
    by_grad = select_topk({n: w.grad.abs().reshape(-1) for n, w in dense.items()}, budget, "global")
    assert any(not torch.equal(expected[n], by_grad[n]) for n in names)

    def inspect(step):
        for n, layer in model.sparse_layers().items():
            assert torch.equal(layer.indices, expected[n]), n
            if layer.num_entries:
                torch.testing.assert_close(layer.values.grad, dense[n].grad.reshape(-1)[layer.indices.long()],
                                           rtol=1e-5, atol=1e-7)

    run_steps(model, batches, SparseAdamW(model.sparse_parameters(), lr=1e-2), 1, inspect)


def test_unmasking_excludes_entries_already_active():
    model = id3_model(num_params=60)
    opt = SparseAdamW(model.sparse_parameters(), lr=1e-2)
    run_steps(model, toy_batches(3), opt, 3)
    assert model.num_sparse_params() == 60  # 20 new, distinct entries per step


def test_grow_with_keep_matches_set_index_sets():
    import copy

    from sparseft.methods.id3 import grow

    gen = torch.Generator().manual_seed(5)
    cfg = sparseft.SparseConfig(method="random", num_params=120)
    a = sparseft.get_sparse_model(tiny_bert(), cfg)
    opt_a = SparseAdamW(a.sparse_parameters(), lr=1e-2)
    for batch in toy_batches(2):
        a(**batch).loss.backward()
        opt_a.step()
        opt_a.zero_grad()
    a(**toy_batches(1)[0]).loss.backward()  # a pending gradient: survivors keep theirs
    b = copy.deepcopy(a)
    opt_b = SparseAdamW(b.sparse_parameters(), lr=1e-2)
    opt_b.load_state_dict(opt_a.state_dict())
    keep, add, targets = {}, {}, {}
    for i, (name, layer) in enumerate(a.sparse_layers().items()):
        keep[name] = torch.rand(layer.num_entries, generator=gen) < (0.7 if i % 2 else 1.0)
        free = torch.ones(layer.weight.numel(), dtype=torch.bool)
        free[layer.indices.long()] = False
        cand = torch.nonzero(free).flatten()
        add[name] = torch.sort(cand[torch.randperm(cand.numel(), generator=gen)[:5 * (i % 3)]]).values.to(torch.int32)
        targets[name] = torch.sort(torch.cat([layer.indices[keep[name]], add[name]])).values
    grads = {n: torch.randn(l.weight.shape, generator=gen) for n, l in a.sparse_layers().items()}
    old_grads = {n: (l.indices.clone(), l.values.grad.clone()) for n, l in a.sparse_layers().items()}
    grow(a, add, opt_a, grads, keep=keep)
    b.set_index_sets(targets, opt_b)
    for name, la in a.sparse_layers().items():
        lb = b.sparse_layers()[name]
        assert torch.equal(la.indices, lb.indices) and torch.equal(la.values, lb.values), name
        for key, val in opt_b.state[lb.values].items():
            assert torch.equal(opt_a.state[la.values][key], val), (name, key)
        was, g = old_grads[name]
        is_old = torch.isin(la.indices, was)
        expected = grads[name].reshape(-1)[la.indices.long()]
        expected[is_old] = g[torch.isin(was, la.indices)]
        assert torch.equal(la.values.grad, expected), name


def test_id3_needs_the_planned_number_of_steps():
    model = id3_model()
    with pytest.raises(RuntimeError, match="on_train_begin"):
        model.method.on_step_begin(1, model)


def test_id3_sparsifies_a_peft_lora_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    from sparseft.methods.id3 import LORA_TARGETS

    lora = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, lora_alpha=4, target_modules=["query", "value"],
                                                            lora_dropout=0.0))
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters()}
    budget, total = 37, 6
    model = sparseft.get_sparse_model(lora, sparseft.SparseConfig(method="id3", num_params=budget,
                                                                    target_modules=LORA_TARGETS))
    assert model.target_names and all(".lora_A." in n or ".lora_B." in n for n in model.target_names)
    assert model.num_targeted_weights() == 2 * 4 * (16 + 16)  # query, value x (A: 4x16, B: 16x4)
    snaps = record_steps(model)
    train(model, toy_batches(total), TrainingArguments(lr=1e-2, max_steps=total, warmup_ratio=0.0, progress=False))
    expected = torch.tensor(unmask_schedule(total, budget, ID3Options().unmask_every)).cumsum(0).tolist()
    assert [sum(s.numel() for s in sets.values()) for _, sets in snaps] == expected
    # the trained adapter differs from its initial LoRA weights in exactly B entries
    changed = 0
    for name, layer in model.sparse_layers().items():
        changed += int((layer.values.detach() != 0).sum())
    assert 0 < changed <= budget and model.num_sparse_params() == budget
    # the LoRA matrices themselves (and the base model) were never written to
    for n, p in model.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    model.save_pretrained(tmp_path / "sparse-lora")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "sparse-lora" / "sparseft_delta.safetensors"))
    assert sum(v.numel() for k, v in saved.items() if k.endswith(".values")) == budget


def test_id3_under_the_transformers_trainer(tmp_path):
    from transformers import Trainer
    from transformers import TrainingArguments as HFArgs

    from sparseft.callback import SparseCallback
    from sparseft.train import create_optimizer

    rows = rows_of(toy_batches(4))
    budget = 22
    model = id3_model(num_params=budget)
    snaps = record_steps(model)
    callback = SparseCallback(model)
    hf_args = HFArgs(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4, report_to=[],
                     save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=hf_args, train_dataset=RowsDataset(rows), optimizers=(create_optimizer(model, 1e-2), None),
            callbacks=[callback]).train()
    assert [sum(s.numel() for s in sets.values()) for _, sets in snaps] == [6, 12, 17, 22]
    assert callback.controller.mean_active_entries == pytest.approx((6 + 12 + 17 + 22) / 4)
    assert any(bool((l.values.detach() != 0).any()) for l in model.sparse_layers().values())
