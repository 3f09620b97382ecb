"""SparseModel end to end on tiny models: outputs, optimizer steps, save/load, merge, bad input."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sparseft.model import file_sha256
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from conftest import build_bert, build_gpt2, make_batch
from sparseft import AdapterError, ConfigError, SparseAdamW, SparseConfig, SparseModel, get_sparse_model
from sparseft.delta import SparseDeltaLayer
from sparseft.model import CONFIG_NAME, WEIGHTS_NAME

BUILDERS = {"bert": build_bert, "gpt2": build_gpt2}


def loss_of(model, arch, batch):
    if arch == "bert":
        labels = torch.tensor([0, 2])
        return model(**batch, labels=labels).loss
    return model(**batch, labels=batch["input_ids"]).loss


def logits_of(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def randomize_values(model: SparseModel, scale: float = 0.05, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.values.copy_(torch.randn(layer.num_entries, generator=gen) * scale)


# -- 2. zero values: outputs unchanged bit for bit ------------------------------------
@pytest.mark.parametrize("budget", [{"density": 0.1}, {"density": 1.0}, {"num_params": 3}])
@pytest.mark.parametrize("hidden", [32, 8])  # small matmuls take other CPU kernels than large ones
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_zero_values_leave_outputs_bit_identical(arch, hidden, budget):
    base = BUILDERS[arch](hidden=hidden)
    batch = make_batch()
    expected = logits_of(base, batch)
    model = get_sparse_model(base, SparseConfig(**budget))
    assert model.num_sparse_params() > 0
    assert all(bool((v == 0).all()) for v in model.sparse_parameters())
    got = logits_of(model, batch)
    assert torch.equal(got, expected)


# -- 3. optimizer steps equal a masked dense update ------------------------------------
class MaskedDense:
    """The dense reference: base weights frozen, a full-shape delta D per target whose
    gradient is multiplied by the 0/1 mask of the sparse model's index."""

    def __init__(self, model_dense: nn.Module, sparse: SparseModel):
        self.model = model_dense
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.deltas, self.masks = {}, {}
        for name, layer in sparse.sparse_layers().items():
            mask = torch.zeros(layer.weight.numel())
            mask[layer.indices.long()] = 1.0
            mask = mask.view_as(layer.weight)
            d = torch.zeros_like(layer.weight, requires_grad=True)
            d.register_hook(lambda g, m=mask: g * m)
            self.deltas[name], self.masks[name] = d, mask
        self.heads = []
        for head in sparse.modules_to_save:
            for p in self.model.get_submodule(head).parameters():
                p.requires_grad_(True)
                self.heads.append(p)

    def params(self):
        return list(self.deltas.values()) + self.heads

    def __call__(self, **kwargs):
        weights = {f"{n}.weight": self.model.get_submodule(n).weight + d for n, d in self.deltas.items()}
        return functional_call(self.model, weights, kwargs=kwargs)


def sparse_head_params(model: SparseModel):
    return [p for head in model.modules_to_save for p in model.model.get_submodule(head).parameters()]


def assert_matches_dense(sparse: SparseModel, ref: MaskedDense, atol: float):
    for name, layer in sparse.sparse_layers().items():
        d = ref.deltas[name].detach().reshape(-1)
        torch.testing.assert_close(layer.values.detach(), d[layer.indices.long()], rtol=1e-5, atol=atol, msg=name)
        outside = torch.ones_like(d, dtype=torch.bool)
        outside[layer.indices.long()] = False
        assert bool((d[outside] == 0).all()), f"{name}: masked entries moved"
    for p_s, p_d in zip(sparse_head_params(sparse), ref.heads):
        torch.testing.assert_close(p_s.detach(), p_d.detach(), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_sparse_adamw_steps_equal_masked_dense_adamw(arch, weight_decay):
    sparse = get_sparse_model(BUILDERS[arch](), SparseConfig(density=0.05, seed=3))
    ref = MaskedDense(BUILDERS[arch](), sparse)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    opt_s = SparseAdamW(sparse.sparse_parameters() + sparse.dense_trainable_parameters(), **hp)
    opt_d = torch.optim.AdamW(ref.params(), **hp)
    assert len(sparse.dense_trainable_parameters()) == len(ref.heads)
    for step in range(4):
        batch = make_batch(seed=step)
        for opt, model in ((opt_s, sparse), (opt_d, ref)):
            opt.zero_grad()
            loss_of(model, arch, batch).backward()
            opt.step()
        assert_matches_dense(sparse, ref, atol=1e-6)
    # something actually moved
    assert any(bool((v != 0).any()) for v in sparse.sparse_parameters())
    torch.testing.assert_close(logits_of(sparse, make_batch()), logits_of(ref, make_batch()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_sgd_steps_equal_masked_dense_sgd(arch):
    """The plain-gradient path at model level: values.grad is the masked dense gradient."""
    sparse = get_sparse_model(BUILDERS[arch](), SparseConfig(density=0.1, seed=4))
    ref = MaskedDense(BUILDERS[arch](), sparse)
    lr = 0.5
    opt_s = torch.optim.SGD(sparse.sparse_parameters() + sparse.dense_trainable_parameters(), lr=lr)
    opt_d = torch.optim.SGD(ref.params(), lr=lr)
    for step in range(3):
        batch = make_batch(seed=10 + step)
        for opt, model in ((opt_s, sparse), (opt_d, ref)):
            opt.zero_grad()
            loss_of(model, arch, batch).backward()
        for name, layer in sparse.sparse_layers().items():
            g = ref.deltas[name].grad.reshape(-1)
            torch.testing.assert_close(layer.values.grad, g[layer.indices.long()], rtol=1e-4, atol=1e-6)
        opt_s.step()
        opt_d.step()
        assert_matches_dense(sparse, ref, atol=1e-6)


def test_first_adam_step_is_lr_times_sign_and_lr_zero_is_noop(tiny_gpt2):
    sparse = get_sparse_model(tiny_gpt2, SparseConfig(density=0.1))
    batch = make_batch()
    params = sparse.sparse_parameters()
    opt = SparseAdamW(params, lr=0.0)
    loss_of(sparse, "gpt2", batch).backward()
    opt.step()
    assert all(bool((p == 0).all()) for p in params)
    lr, eps = 1e-3, 1e-8
    opt = SparseAdamW(params, lr=lr, eps=eps)
    opt.step()  # same gradients, fresh optimizer
    for p in params:
        expected = -lr * p.grad / (p.grad.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.9)])
def test_sparse_adamw_matches_torch_adamw_dense(betas, weight_decay):
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(7, 5, generator=gen)
    a = nn.Parameter(init.clone())
    b = nn.Parameter(init.clone())
    hp = dict(lr=3e-2, betas=betas, eps=1e-8, weight_decay=weight_decay)
    opt_a, opt_b = SparseAdamW([a], **hp), torch.optim.AdamW([b], **hp)
    for _ in range(8):
        g = torch.randn(7, 5, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def test_sparse_adamw_rejects_bad_settings_and_unmapped_resize():
    p = nn.Parameter(torch.zeros(3))
    for bad in (dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(weight_decay=-0.1), dict(eps=-1.0)):
        with pytest.raises(ValueError, match="invalid AdamW settings"):
            SparseAdamW([p], **bad)
    opt = SparseAdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    p.data = torch.zeros(4)
    p.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="remap_entries"):
        opt.step()


# -- 4. per-entry steps across index changes ------------------------------------------
def adam_reference(value, m, v, step, g, lr, beta1, beta2, eps, wd):
    """One AdamW update of scalars with their own step count (float64)."""
    value, m, v, g = (t.double() for t in (value, m, v, g))
    step = step.double() + 1
    value = value * (1 - lr * wd)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    update = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + eps)
    return value - lr * update


def test_sparse_adamw_per_entry_step_after_set_index_sets(tiny_gpt2):
    sparse = get_sparse_model(tiny_gpt2, SparseConfig(density=0.05, seed=1))
    name = sparse.target_names[0]
    layer = sparse.sparse_layers()[name]
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt = SparseAdamW(sparse.sparse_parameters(), **hp)
    for step in range(5):
        opt.zero_grad()
        loss_of(sparse, "gpt2", make_batch(seed=step)).backward()
        opt.step()

    old_idx = layer.indices.clone()
    old_vals = layer.values.detach().clone()
    old_state = {k: v.clone() for k, v in opt.state[layer.values].items()}
    assert old_state["step"].dim() == 0 and float(old_state["step"]) == 5  # one count while all entries agree
    dropped = old_idx[[0, 3]]
    keep_mask = torch.ones(old_idx.numel(), dtype=torch.bool)
    keep_mask[[0, 3]] = False
    candidates = torch.ones(layer.weight.numel(), dtype=torch.bool)
    candidates[old_idx.long()] = False
    added = candidates.nonzero().flatten()[:1].to(torch.int32)  # one entry never seen before
    new_idx = torch.cat([old_idx[keep_mask], added]).sort().values

    param = layer.values
    sparse.set_index_sets({name: new_idx}, optimizer=opt)
    assert layer.values is param  # the optimizer still holds the same Parameter
    assert torch.equal(layer.indices, new_idx)
    state = opt.state[layer.values]
    kept_new = torch.isin(new_idx, old_idx).nonzero().flatten()
    kept_old = torch.isin(old_idx, new_idx).nonzero().flatten()
    new_pos = int((new_idx == added).nonzero())
    # kept entries keep value and moments
    assert torch.equal(layer.values.detach()[kept_new], old_vals[kept_old])
    old_state["step"] = old_state["step"].expand(old_idx.shape)
    for key in ("exp_avg", "exp_avg_sq", "step"):  # a new entry beside old ones: one count per entry
        assert state[key].shape == new_idx.shape
        assert torch.equal(state[key][kept_new], old_state[key][kept_old]), key
        assert float(state[key][new_pos]) == 0.0, key
    assert float(layer.values.detach()[new_pos]) == 0.0
    # dropped entries leave no trace: gone from the index, and the sizes match the new set
    assert not torch.isin(dropped, layer.indices).any()
    assert layer.values.numel() == new_idx.numel()

    before_vals = layer.values.detach().clone()
    before_state = {k: v.clone() for k, v in state.items()}
    opt.zero_grad()
    loss_of(sparse, "gpt2", make_batch(seed=99)).backward()
    grad = layer.values.grad.detach().clone()
    assert float(grad[new_pos]) != 0.0
    opt.step()
    after = layer.values.detach()

    # the new entry's first update equals a fresh torch AdamW's first update on that scalar
    fresh = nn.Parameter(torch.zeros(1))
    fresh.grad = grad[new_pos:new_pos + 1].clone()
    torch.optim.AdamW([fresh], **hp).step()
    torch.testing.assert_close(after[new_pos:new_pos + 1], fresh.detach(), rtol=1e-5, atol=1e-9)
    assert abs(float(after[new_pos])) == pytest.approx(hp["lr"], rel=0.02)  # about lr (eps aside), not 3 x lr
    assert float(opt.state[layer.values]["step"][new_pos]) == 1.0
    # kept entries continue their own Adam trajectory (step 6)
    expected = adam_reference(
        before_vals, before_state["exp_avg"], before_state["exp_avg_sq"], before_state["step"], grad,
        hp["lr"], *hp["betas"], hp["eps"], hp["weight_decay"],
    )
    torch.testing.assert_close(after[kept_new].double(), expected[kept_new], rtol=1e-5, atol=1e-9)
    assert bool((opt.state[layer.values]["step"][kept_new] == 6).all())

    # a dropped entry that comes back starts from scratch
    back = dropped[:1]
    sparse.set_index_sets({name: torch.cat([layer.indices, back]).sort().values}, optimizer=opt)
    pos = int((layer.indices == back).nonzero())
    assert float(layer.values.detach()[pos]) == 0.0
    assert all(float(opt.state[layer.values][k][pos]) == 0.0 for k in ("exp_avg", "exp_avg_sq", "step"))


# -- 5. save / load / merge ------------------------------------------------------------
def trained_model(arch, seed=0):
    model = get_sparse_model(BUILDERS[arch](), SparseConfig(density=0.1, seed=seed))
    randomize_values(model, seed=seed)
    with torch.no_grad():
        for p in model.dense_trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return model


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_save_load_roundtrip_identical_logits(arch, tmp_path):
    model = trained_model(arch)
    batch = make_batch()
    expected = logits_of(model, batch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / WEIGHTS_NAME).is_file()

    loaded = SparseModel.from_pretrained(BUILDERS[arch](), tmp_path)
    assert torch.equal(logits_of(loaded, batch), expected)
    assert loaded.target_names == model.target_names
    assert loaded.sparse_config == model.sparse_config
    for (n1, l1), (n2, l2) in zip(model.sparse_layers().items(), loaded.sparse_layers().items()):
        assert n1 == n2 and torch.equal(l1.indices, l2.indices) and torch.equal(l1.values, l2.values)
    if arch == "bert":
        assert loaded.modules_to_save == ["classifier"]
        for p1, p2 in zip(model.model.classifier.parameters(), loaded.model.classifier.parameters()):
            assert torch.equal(p1, p2) and not p2.requires_grad  # frozen unless is_trainable, as in peft
        # the head differs from a fresh model's: it really came from the file
        assert not torch.equal(build_bert().classifier.weight, loaded.model.classifier.weight)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_adapter_file_holds_no_base_weights(arch, tmp_path):
    model = trained_model(arch)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
    base_keys = set(BUILDERS[arch]().state_dict())
    expected = {f"{n}.{part}" for n in model.target_names for part in ("indices", "values")}
    if arch == "bert":
        expected |= {"modules_to_save.classifier.weight", "modules_to_save.classifier.bias"}
    assert keys == expected
    assert not keys & base_keys
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert all(tensors[f"{n}.indices"].dtype == torch.int32 for n in model.target_names)
    n_stored = sum(tensors[f"{n}.values"].numel() for n in model.target_names)
    assert n_stored == model.num_sparse_params()
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["sparse_config"]["density"] == 0.1
    assert set(meta["targets"]) == set(model.target_names)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_merge_and_unload(arch):
    model = trained_model(arch)
    batch = make_batch()
    expected = logits_of(model, batch)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SparseDeltaLayer) for m in merged.modules())
    reference = BUILDERS[arch]()
    ref_types = {n: type(m) for n, m in reference.named_modules()}
    assert {n: type(m) for n, m in merged.named_modules()} == ref_types
    assert type(merged) is type(reference)
    torch.testing.assert_close(logits_of(merged, batch), expected, rtol=0, atol=1e-5)
    # the state dict has the original keys, with no sparse leftovers
    assert set(merged.state_dict()) == set(reference.state_dict())
    classes = {type(merged.get_submodule(n)) for n in model_targets(arch)}
    assert classes <= {nn.Linear, Conv1D}


def model_targets(arch):
    return get_sparse_model(BUILDERS[arch](), SparseConfig(density=0.1)).target_names


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_merge_unmerge_restores_base_bit_exact(arch):
    model = trained_model(arch)
    batch = make_batch()
    before = {k: v.clone() for k, v in model.model.state_dict().items() if not k.endswith((".values", ".indices"))}
    sparse_logits = logits_of(model, batch)
    model.merge()
    assert all(layer.merged for layer in model.sparse_layers().values())
    changed = [k for k, v in model.model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed, "merge changed no base weight"
    torch.testing.assert_close(logits_of(model, batch), sparse_logits, rtol=0, atol=1e-5)
    model.unmerge()
    after = model.model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert torch.equal(logits_of(model, batch), sparse_logits)


def test_unload_returns_original_weights(tiny_bert):
    original = {k: v.clone() for k, v in build_bert().state_dict().items()}
    model = get_sparse_model(tiny_bert, SparseConfig(density=0.1))
    randomize_values(model)
    base = model.unload()
    assert not any(isinstance(m, SparseDeltaLayer) for m in base.modules())
    for k, v in base.state_dict().items():
        assert torch.equal(v, original[k]), k


# -- 8. bad input ---------------------------------------------------------------------
@pytest.mark.parametrize("density", [0, 0.0, -1, 1.5])
def test_bad_density(density):
    with pytest.raises(ConfigError, match=r"density must be in \(0, 1\]"):
        SparseConfig(density=density)


@pytest.mark.parametrize("budget", [dict(density=0.1, num_params=5), dict(num_params=5, match_lora_rank=2),
                                    dict(density=0.1, match_lora_rank=2)])
def test_two_budgets(budget):
    with pytest.raises(ConfigError, match="exactly one budget"):
        SparseConfig(**budget)


@pytest.mark.parametrize("field, value", [("num_params", 0), ("num_params", 2.5), ("match_lora_rank", -1),
                                          ("num_params", True), ("selection", "both"), ("backend", "cuda")])
def test_bad_budget_values(field, value):
    with pytest.raises(ConfigError, match=field if field in ("num_params", "match_lora_rank") else value):
        SparseConfig(**{field: value})


def test_unknown_method():
    with pytest.raises(ConfigError, match="method='nonsense' is not known"):
        SparseConfig(method="nonsense")


def test_unknown_field_in_from_dict():
    data = SparseConfig(density=0.1).to_dict()
    assert SparseConfig.from_dict(data) == SparseConfig(density=0.1)
    data["learning_rate"] = 1.0
    with pytest.raises(ConfigError, match="unknown config field.*learning_rate"):
        SparseConfig.from_dict(data)
    with pytest.raises(ConfigError, match="JSON object"):
        SparseConfig.from_dict(["density"])


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError) and issubclass(AdapterError, ValueError)


def test_no_module_matches():
    with pytest.raises(ConfigError, match="no Linear/Conv1D module matches target_modules"):
        get_sparse_model(build_bert(), SparseConfig(target_modules=["does_not_exist"]))


@pytest.fixture
def saved_bert(tmp_path):
    trained_model("bert").save_pretrained(tmp_path)
    return tmp_path


def test_adapter_for_other_shapes(saved_bert):
    other = build_bert(hidden=48)
    with pytest.raises(AdapterError, match="adapter expects a weight of shape"):
        SparseModel.from_pretrained(other, saved_bert)
    assert not any(isinstance(m, SparseDeltaLayer) for m in other.modules())


def test_missing_adapter_files(saved_bert, tmp_path):
    with pytest.raises(AdapterError, match="no adapter at"):
        SparseModel.from_pretrained(build_bert(), tmp_path / "nowhere")
    (saved_bert / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match=f"{WEIGHTS_NAME} is missing"):
        SparseModel.from_pretrained(build_bert(), saved_bert)


def test_missing_config_file(saved_bert):
    (saved_bert / CONFIG_NAME).unlink()
    with pytest.raises(AdapterError, match=f"{CONFIG_NAME} is missing"):
        SparseModel.from_pretrained(build_bert(), saved_bert)


@pytest.mark.parametrize("garbage", [b"", b"not a safetensors file at all" * 10, b"\xff" * 64,
                                     (8).to_bytes(8, "little") + b"{bad json"])
def test_corrupt_safetensors(saved_bert, garbage):
    (saved_bert / WEIGHTS_NAME).write_bytes(garbage)
    restamp(saved_bert)  # a consistent but hostile adapter: the checksum alone must not be the only guard
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        SparseModel.from_pretrained(build_bert(), saved_bert)


def test_corrupt_config_json(saved_bert):
    (saved_bert / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        SparseModel.from_pretrained(build_bert(), saved_bert)


def restamp(folder):
    """Record the weights file's current checksum, as a hostile but careful author would."""
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["weights_sha256"] = file_sha256(folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def rewrite(folder, edit):
    tensors = load_file(str(folder / WEIGHTS_NAME))
    meta = json.loads((folder / CONFIG_NAME).read_text())
    name = next(iter(meta["targets"]))
    edit(tensors, name)
    save_file(tensors, str(folder / WEIGHTS_NAME))
    restamp(folder)
    return name


def test_a_flipped_byte_anywhere_in_the_weights_is_caught(saved_bert):
    data = bytearray((saved_bert / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 0x01  # inside the last value: still a well-formed file, silently wrong without the checksum
    (saved_bert / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="does not match the checksum"):
        SparseModel.from_pretrained(build_bert(), saved_bert)


def _set(key_suffix, fn):
    def edit(tensors, name):
        tensors[f"{name}.{key_suffix}"] = fn(tensors[f"{name}.{key_suffix}"]).contiguous()
    return edit


def _out_of_range(idx):
    idx = idx.clone()
    idx[-1] = 10**6
    return idx


def _unsorted(idx):
    return idx.flip(0)


def _duplicate(idx):
    idx = idx.clone()
    idx[1] = idx[0]
    return idx


def _nan_values(vals):
    vals = vals.clone()
    vals[0] = float("nan")
    return vals


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set("indices", _out_of_range), "must lie in"),
        (_set("indices", _unsorted), "sorted and unique"),
        (_set("indices", _duplicate), "sorted and unique"),
        (_set("indices", lambda i: i.long()), "must be int32"),
        (_set("indices", lambda i: i.float()), "must be int32"),
        (_set("values", lambda v: v[:-1]), "indices but"),
        (_set("values", _nan_values), "NaN"),
        (_set("values", lambda v: v.to(torch.int32)), "floating point"),
        (lambda t, n: t.pop(f"{n}.values"), "missing"),
        (lambda t, n: t.__setitem__("bert.embeddings.word_embeddings.weight", torch.zeros(2)), "unexpected"),
    ],
    ids=["out-of-range", "unsorted", "duplicate", "int64", "float-index", "count-mismatch", "nan", "int-values",
         "missing-tensor", "extra-tensor"],
)
def test_bad_tensors_in_adapter(saved_bert, edit, message):
    rewrite(saved_bert, edit)
    base = build_bert()
    with pytest.raises(AdapterError, match=message):
        SparseModel.from_pretrained(base, saved_bert)
    assert not any(isinstance(m, SparseDeltaLayer) for m in base.modules())


def edit_meta(folder, fn):
    meta = json.loads((folder / CONFIG_NAME).read_text())
    fn(meta)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def test_fingerprint_mismatch_refused_without_force(saved_bert):
    def tamper(meta):
        meta["base_model"]["fingerprint"] = "0123456789abcdef"
    edit_meta(saved_bert, tamper)
    base = build_bert()
    expected_weights = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterError, match="fingerprint.*force=True"):
        SparseModel.from_pretrained(base, saved_bert)
    # the refused load leaves the base model as it was
    assert not any(isinstance(m, SparseDeltaLayer) for m in base.modules())
    assert set(base.state_dict()) == set(expected_weights)
    loaded = SparseModel.from_pretrained(build_bert(), saved_bert, force=True)
    assert loaded.num_sparse_params() > 0


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda m: m.__setitem__("format_version", 99), "format_version"),
        (lambda m: m.pop("targets"), "not a sparseft adapter"),
        (lambda m: m["sparse_config"].__setitem__("density", 2.0), "density"),
        (lambda m: m["sparse_config"].__setitem__("bogus", 1), "unknown config field"),
        (lambda m: m.__setitem__("targets", {"bert.pooler.dense": [32]}), "targets"),
        (lambda m: m.__setitem__("modules_to_save", ["classifier", "no_such_head"]), "no_such_head"),
    ],
    ids=["version", "no-targets", "bad-density", "unknown-field", "bad-shape", "missing-head"],
)
def test_bad_adapter_config(saved_bert, tamper, message):
    edit_meta(saved_bert, tamper)
    with pytest.raises(AdapterError, match=message):
        SparseModel.from_pretrained(build_bert(), saved_bert)


def test_adapter_target_missing_from_base(saved_bert):
    gpt2 = build_gpt2()
    with pytest.raises(AdapterError, match="has no module"):
        SparseModel.from_pretrained(gpt2, saved_bert)


def test_sparse_adamw_reads_no_step_counts_back_on_ordinary_steps(tiny_gpt2, monkeypatch):
    """Entries of one age are tracked on the host: after the first step no update compares
    the per-entry counts (a device sync per parameter on a GPU). State restored from
    tensors only, or unpickled, is looked at once and keeps counting."""
    import pickle

    sparse = get_sparse_model(tiny_gpt2, SparseConfig(density=0.05, seed=1))
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt = SparseAdamW(sparse.sparse_parameters(), **hp)
    looks = []
    real = SparseAdamW._common_age
    monkeypatch.setattr(SparseAdamW, "_common_age", staticmethod(lambda step: looks.append(1) or real(step)))
    for step in range(3):
        opt.zero_grad()
        loss_of(sparse, "gpt2", make_batch(seed=step)).backward()
        opt.step()
    assert looks == []
    twin = pickle.loads(pickle.dumps(opt))  # torch pickles defaults, state and groups only
    assert twin._ages == {}
    params = sparse.sparse_parameters()
    fresh_state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    opt.state.clear()
    opt.state.update(fresh_state)  # as a checkpoint restore does
    opt.zero_grad()
    loss_of(sparse, "gpt2", make_batch(seed=9)).backward()
    opt.step()
    assert len(looks) == len(params)
    assert all(bool((opt.state[p]["step"] == 4).all()) for p in params)
