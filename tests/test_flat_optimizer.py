"""The packed (flat) SparseAdamW step: the same numbers as the per-parameter step, bit for
bit on CPU, through index-set changes (the pack is rebuilt) and mixed entry ages."""
from __future__ import annotations

import copy

import torch

import sparseft
from sparseft.optim import SparseAdamW

from conftest import build_bert, make_batch


def _pair(**cfg):
    model = sparseft.get_sparse_model(build_bert(hidden=32), sparseft.SparseConfig(method="random", **cfg))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for v in model.sparse_parameters():
            v.copy_(torch.randn(v.shape, generator=gen) * 0.01)
    other = copy.deepcopy(model)
    return model, other


def _opt(model, flat):
    groups = [{"params": model.sparse_parameters(), "weight_decay": 0.1},
              {"params": model.dense_trainable_parameters(), "weight_decay": 0.0}]
    return SparseAdamW(groups, lr=1e-2, flat=flat)


def _step(model, opt, seed):
    out = model(**make_batch(seed=seed)).logits
    out.pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _assert_same(a, b, opt_a, opt_b):
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    for pa, pb in zip(a.sparse_parameters(), b.sparse_parameters()):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[key], sb[key]), key


def test_flat_step_equals_the_per_parameter_step_bit_for_bit():
    flat_model, plain_model = _pair(density=0.1)
    flat_opt, plain_opt = _opt(flat_model, True), _opt(plain_model, False)
    for seed in range(4):
        _step(flat_model, flat_opt, seed)
        _step(plain_model, plain_opt, seed)
        _assert_same(flat_model, plain_model, flat_opt, plain_opt)
    # the sparse values really are views of one buffer
    values = flat_model.sparse_parameters()
    storages = {v.untyped_storage().data_ptr() for v in values}
    assert len(storages) == 1
    pack = next(iter(flat_opt._packs.values()))
    assert pack.values.numel() >= sum(v.numel() for v in values)


def test_index_set_changes_rebuild_the_pack_and_stay_equal():
    flat_model, plain_model = _pair(density=0.1)
    flat_opt, plain_opt = _opt(flat_model, True), _opt(plain_model, False)
    _step(flat_model, flat_opt, 0)
    _step(plain_model, plain_opt, 0)
    gen = torch.Generator().manual_seed(5)
    new_sets = {}
    for name, layer in flat_model.sparse_layers().items():
        keep = layer.indices[::2]
        extra = torch.randperm(layer.weight.numel(), generator=gen)[:7].to(torch.int32)
        new_sets[name] = torch.unique(torch.cat([keep, extra]))
    flat_model.set_index_sets(new_sets, flat_opt)
    plain_model.set_index_sets(new_sets, plain_opt)
    for seed in range(1, 4):  # fresh entries mix ages: the per-entry path for those layers
        _step(flat_model, flat_opt, seed)
        _step(plain_model, plain_opt, seed)
        _assert_same(flat_model, plain_model, flat_opt, plain_opt)


def test_packed_state_saves_and_restores(tmp_path):
    model, _ = _pair(density=0.1)
    opt = _opt(model, True)
    _step(model, opt, 0)
    state = copy.deepcopy(opt.state_dict())
    fresh = _opt(model, True)
    fresh.load_state_dict(state)
    _step(model, fresh, 1)  # loaded state is separate tensors: packed again
    assert len({v.untyped_storage().data_ptr() for v in model.sparse_parameters()}) == 1


def test_a_static_mask_keeps_one_step_count_per_parameter_and_older_per_entry_counts_still_load():
    model, other = _pair(density=0.1)
    opt, old_format = _opt(model, True), _opt(other, True)
    _step(model, opt, 0)
    _step(other, old_format, 0)
    assert all(opt.state[p]["step"].dim() == 0 for p in model.sparse_parameters())  # not 4 bytes per entry
    # a state saved with one count per entry (as earlier versions did) gives the same steps
    state = old_format.state_dict()
    for i, p in enumerate(other.sparse_parameters()):  # the first group's: state keys 0..n-1
        state["state"][i]["step"] = state["state"][i]["step"].expand(p.shape).clone()
    old_format = _opt(other, True)
    old_format.load_state_dict(state)
    for seed in (1, 2):
        _step(model, opt, seed)
        _step(other, old_format, seed)
    for pa, pb in zip(model.sparse_parameters(), other.sparse_parameters()):
        assert torch.equal(pa, pb)
        assert torch.equal(old_format.state[pb]["step"], torch.full(pb.shape, 3.0))
