"""Every scorer against a direct, slow reference computed on a plain copy of the model."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_bert, build_gpt2, make_batch
from sparseft import ConfigError, SparseConfig, get_sparse_model
from sparseft.config import CalibrationOptions, DynamicOptions, ID3Options
from sparseft.scoring import SCORERS, compute_scores
from sparseft.select import resolve_budget, select_topk

BUILDERS = {"bert": build_bert, "gpt2": build_gpt2}


def calib_batches(arch: str) -> list[dict]:
    """Two batches of different sizes (2 and 3 examples), with padding, with labels."""
    batches = []
    for size, seed in ((2, 11), (3, 12)):
        b = make_batch(batch=size, seq=6, seed=seed)
        if arch == "bert":
            b["labels"] = torch.arange(size) % 3
        else:
            b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        batches.append(b)
    return batches


def wrapped(arch: str, seed: int = 0):
    """A sparse model with empty index sets, and a plain copy of the same base model."""
    base = BUILDERS[arch](seed=seed)
    plain = copy.deepcopy(base)
    model = get_sparse_model(base, SparseConfig(method="random", num_params=1))
    model.set_index_sets({n: torch.zeros(0, dtype=torch.int32) for n in model.target_names})
    return model, plain


def plain_weights(plain, names):
    return [plain.get_submodule(n).weight for n in names]


def reference_mean_grad(plain, names, batches, dtype=torch.float32):
    """sum_b (n_b / N) grad L_b by loss.backward() on the plain model."""
    plain = copy.deepcopy(plain).to(dtype)
    weights = plain_weights(plain, names)
    for w in weights:
        w.requires_grad_(True)
    total = sum(b["input_ids"].shape[0] for b in batches)
    for b in batches:
        (plain(**b).loss * (b["input_ids"].shape[0] / total)).backward()
    return plain, [w.grad.detach().clone() for w in weights]


# atol is relative to each matrix's largest score: fp32 sums in another order differ by a
# few ulps on entries near zero (1e-6 of the largest score was one ulp too tight there).
def assert_scores_close(got: dict, ref: list, names, rtol=1e-5, atol_frac=1e-5):
    for name, r in zip(names, ref):
        r = r.reshape(-1).float()
        scale = float(r.abs().max()) or 1.0
        torch.testing.assert_close(got[name], r, rtol=rtol, atol=atol_frac * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("method", ["gradient", "snip", "taylor", "d3"])
def test_gradient_family_matches_loss_backward_on_a_plain_copy(arch, method):
    model, plain = wrapped(arch)
    names = model.target_names
    batches = calib_batches(arch)
    eps, expo = 1e-3, 1.5
    got = compute_scores(method, model.sparse_layers(), model=model, data=batches, d3_epsilon=eps, d3_exponent=expo)
    plain, grads = reference_mean_grad(plain, names, batches)
    ref = []
    for w, g in zip(plain_weights(plain, names), grads):
        w = w.detach()
        ref.append({"gradient": g.abs(), "snip": (w * g).abs(), "taylor": (w * g) ** 2,
                    "d3": g.abs() / (w.abs() + eps) ** expo}[method])
    assert_scores_close(got, ref, names)
    # No dense weight gradient was left behind, and nothing else was touched.
    assert all(layer.weight.grad is None for layer in model.sparse_layers().values())
    assert all(p.grad is None for p in model.parameters())


def test_d3_with_exponent_zero_is_gradient():
    model, _ = wrapped("bert")
    batches = calib_batches("bert")
    a = compute_scores("d3", model.sparse_layers(), model=model, data=batches, d3_exponent=0.0)
    b = compute_scores("gradient", model.sparse_layers(), model=model, data=batches)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_fisher_is_mean_of_per_example_squared_gradients(arch):
    model, plain = wrapped(arch)
    names = model.target_names
    batches = calib_batches(arch)
    got = compute_scores("fisher", model.sparse_layers(), model=model, data=batches)
    weights = plain_weights(plain, names)
    for w in weights:
        w.requires_grad_(True)
    acc = [torch.zeros_like(w) for w in weights]
    count = 0
    for b in batches:  # a Python loop over single examples
        for i in range(b["input_ids"].shape[0]):
            example = {k: v[i:i + 1] for k, v in b.items()}
            for w in weights:
                w.grad = None
            plain(**example).loss.backward()
            for a, w in zip(acc, weights):
                a += w.grad ** 2
            count += 1
    assert_scores_close(got, [a / count for a in acc], names)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_grasp_matches_finite_difference_hessian_gradient_product(arch):
    """w * (H g): H g from central differences of the float64 gradient along g."""
    model, plain = wrapped(arch)
    names = model.target_names
    batches = calib_batches(arch)
    got = compute_scores("grasp", model.sparse_layers(), model=model, data=batches)
    plain64, g = reference_mean_grad(plain, names, batches, torch.float64)
    h = 1e-4 / max(float(x.abs().max()) for x in g)

    def grad_at(sign):
        shifted = copy.deepcopy(plain64)
        with torch.no_grad():
            for w, d in zip(plain_weights(shifted, names), g):
                w.add_(sign * h * d)
        return reference_mean_grad(shifted, names, batches, torch.float64)[1]

    plus, minus = grad_at(+1), grad_at(-1)
    hg = [(p - m) / (2 * h) for p, m in zip(plus, minus)]
    ref = [w.detach() * x for w, x in zip(plain_weights(plain64, names), hg)]
    assert_scores_close(got, ref, names, rtol=2e-3, atol_frac=2e-3)
    assert all(not layer.weight.requires_grad for layer in model.sparse_layers().values())


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_synflow_matches_positive_copy_and_restores_weights_exactly(arch):
    model, plain = wrapped(arch)
    names = model.target_names
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = compute_scores("synflow", model.sparse_layers(), model=model)
    after = model.state_dict()
    for k, v in before.items():  # bit for bit, signs of zeros included
        assert torch.equal(v.view(-1).view(torch.uint8) if v.is_floating_point() else v,
                           after[k].view(-1).view(torch.uint8) if v.is_floating_point() else after[k]), k
    positive = copy.deepcopy(plain)
    with torch.no_grad():
        for p in positive.parameters():
            p.abs_()
    weights = plain_weights(positive, names)
    for w in weights:
        w.requires_grad_(True)
    hidden = positive.get_input_embeddings().weight.shape[1]
    positive(inputs_embeds=torch.ones(1, 1, hidden)).logits.sum().backward()
    ref = [(w * w.grad).abs().detach() for w in weights]
    assert_scores_close(got, ref, names)


def test_random_is_seeded_and_magnitude_is_abs_weight():
    model, plain = wrapped("bert")
    layers = model.sparse_layers()
    a = compute_scores("random", layers, seed=3)
    b = compute_scores("random", layers, seed=3)
    c = compute_scores("random", layers, seed=4)
    assert all(torch.equal(a[n], b[n]) for n in a) and not all(torch.equal(a[n], c[n]) for n in a)
    mag = compute_scores("magnitude", layers, order="smallest")
    for n in model.target_names:
        assert torch.equal(mag[n], -plain.get_submodule(n).weight.detach().abs().reshape(-1))


@pytest.mark.parametrize("method", sorted(SCORERS))
@pytest.mark.parametrize("selection", ["global", "per-layer"])
def test_get_sparse_model_selects_the_exact_topk_of_the_scores(method, selection):
    batches = calib_batches("bert")
    cfg = SparseConfig(method=method, density=0.05, selection=selection, id3=ID3Options(d3_exponent=1.0))
    model = get_sparse_model(build_bert(), cfg, calibration_data=batches)
    ref_model, _ = wrapped("bert")
    scores = compute_scores(method, ref_model.sparse_layers(), model=ref_model, data=batches, seed=cfg.seed,
                            order=cfg.magnitude_order, d3_epsilon=cfg.id3.d3_epsilon, d3_exponent=cfg.id3.d3_exponent)
    expected = select_topk(scores, resolve_budget(cfg, model.target_shapes()), selection)
    assert model.num_sparse_params() == resolve_budget(cfg, model.target_shapes())
    for name, layer in model.sparse_layers().items():
        assert torch.equal(layer.indices, expected[name]), name
    # Selection leaves the model as it was: eval/train mode, no grads, outputs unchanged.
    assert all(p.grad is None for p in model.parameters())


def test_select_consume_gives_the_same_sets_without_a_copy():
    gen = torch.Generator().manual_seed(0)
    scores = {"a": torch.randn(500, generator=gen), "b": torch.randn(300, generator=gen).round()}  # many ties in b
    expected = select_topk(scores, 123, "global")
    consumed = {k: v.clone() for k, v in scores.items()}
    got = select_topk(consumed, 123, "global", consume=True)
    assert all(torch.equal(got[k], expected[k]) for k in scores)
    flat = torch.cat([scores["a"], scores["b"]])
    assert torch.equal(torch.sort(flat, descending=True).values[122], torch.cat([scores[k][got[k].long()] for k in "ab"]).min())


def test_scoring_restores_training_mode_and_existing_grads():
    model, _ = wrapped("bert")
    model.train()
    head = model.dense_trainable_parameters()[0]
    head.grad = torch.ones_like(head)
    compute_scores("gradient", model.sparse_layers(), model=model, data=calib_batches("bert"))
    assert model.training and torch.equal(head.grad, torch.ones_like(head))


def test_calibration_scorers_need_data_with_labels():
    with pytest.raises(ValueError, match="calibration"):
        get_sparse_model(build_bert(), SparseConfig(method="gradient"))
    batch = make_batch()
    with pytest.raises(ValueError, match="labels"):
        get_sparse_model(build_bert(), SparseConfig(method="snip"), calibration_data=[batch])


@pytest.mark.parametrize("field,value", [("calibration.examples", 0), ("dynamic.update_every", -1),
                                         ("id3.d3_exponent", -1.0), ("schedule", "sometimes"),
                                         ("dynamic.drop_policy", "keep"), ("dynamic.score_window", 0)])
def test_bad_scoring_config(field, value):
    owner, _, name = field.rpartition(".")
    with pytest.raises(ConfigError, match=field):
        SparseConfig(**({owner: {name: value}} if owner else {name: value}))


@pytest.mark.parametrize("method", ["fisher", "grasp"])
def test_dynamic_refuses_scorers_that_need_extra_passes(method):
    with pytest.raises(ConfigError, match="dynamic"):
        SparseConfig(method=method, schedule="dynamic")


def test_config_roundtrip_keeps_new_fields():
    cfg = SparseConfig(method="d3", schedule="dynamic", dynamic=DynamicOptions(16, 2, "zero"),
                       calibration=CalibrationOptions(examples=64), id3=ID3Options(d3_epsilon=1e-2, d3_exponent=0.5))
    assert SparseConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------ micro-batches, grasp groups
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("method", ["gradient", "snip", "taylor", "d3", "grasp"])
@pytest.mark.parametrize("micro", [1, 2])
def test_micro_batched_scoring_equals_whole_batch_scoring(arch, method, micro):
    """Splitting the calibration batches (2 and 3 examples, padded; gpt2's token labels
    have -100 on padding) into micro-batches gives the whole-batch scores to fp32 tolerance."""
    model, _ = wrapped(arch)
    batches = calib_batches(arch)
    layers = model.sparse_layers()
    whole = compute_scores(method, layers, model=model, data=batches, d3_exponent=1.0)
    split = compute_scores(method, layers, model=model, data=batches, d3_exponent=1.0, micro_batch=micro)
    assert_scores_close(split, [whole[n] for n in model.target_names], model.target_names, rtol=1e-4, atol_frac=1e-5)


def test_loss_items_follow_the_loss_normalisation():
    from sparseft.scoring import loss_items, micro_batches

    gpt2, _ = wrapped("gpt2")
    bert, _ = wrapped("bert")
    b = calib_batches("gpt2")[0]  # 2 x 6 tokens, the second has 2 padding tokens labelled -100
    assert loss_items(gpt2, b) == 5 + 3  # causal LM: the first token of each row is never a target
    assert loss_items(bert, calib_batches("bert")[1]) == 3  # one label per example
    pieces = list(micro_batches(gpt2, b, 1))
    assert [w for _, w in pieces] == [5 / 8, 3 / 8]
    # A piece with nothing to predict (mean loss NaN) is skipped, not weighted by zero.
    b = {k: v.clone() for k, v in b.items()}
    b["labels"][1] = -100
    assert [w for _, w in micro_batches(gpt2, b, 1)] == [1.0]
    assert list(micro_batches(gpt2, b, None))[0][1] == 1.0


@pytest.mark.parametrize("selection", ["global", "per-layer"])
@pytest.mark.parametrize("fraction", [0.0, 0.3])
def test_grasp_select_in_groups_equals_topk_of_the_dense_scores(selection, fraction):
    from sparseft.scoring import grasp_groups, grasp_select

    for arch in ("bert", "gpt2"):
        model, _ = wrapped(arch)
        layers = model.sparse_layers()
        batches = calib_batches(arch)
        groups = grasp_groups(layers, fraction)
        assert [n for g in groups for n in g] == list(layers) and len(groups) > 1
        budget = sum(layer.weight.numel() for layer in layers.values()) // 20
        expected = select_topk(compute_scores("grasp", layers, model=model, data=batches), budget, selection)
        got = grasp_select(layers, budget, selection, model=model, data=batches, group_fraction=fraction,
                           group_min_bytes=0)
        assert all(torch.equal(got[n], expected[n]) for n in layers), arch
        assert all(not layer.weight.requires_grad and layer.weight.grad is None for layer in layers.values())
        assert all(p.grad is None for p in model.parameters())


def test_grasp_groups_have_a_floor_in_bytes():
    from sparseft.scoring import grasp_groups

    model, _ = wrapped("bert")
    layers = model.sparse_layers()
    total = sum(layer.weight.numel() for layer in layers.values())
    assert len(grasp_groups(layers, 0.125)) > 1
    assert grasp_groups(layers, 0.125, min_bytes=4 * total) == [list(layers)]  # all of H g fits: one pass
    assert grasp_groups(layers, 0.125, min_bytes=4 * total // 2) == grasp_groups(layers, 0.5)


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "2"])
def test_bad_calib_micro_batch(value):
    with pytest.raises(ConfigError, match="calibration.micro_batch"):
        CalibrationOptions(micro_batch=value)


def _tiny_llama():
    """A tiny LlamaForCausalLM (SiLU MLP, grouped-query attention, rotary), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = get_sparse_model(LlamaForCausalLM(cfg).eval(), SparseConfig(method="random", num_params=1))
    model.set_index_sets({n: torch.zeros(0, dtype=torch.int32) for n in model.target_names})
    batches = []
    for size, seed in ((2, 11), (3, 12)):
        b = make_batch(batch=size, seq=6, seed=seed)
        b["input_ids"] = b["input_ids"] % 50
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        batches.append(b)
    return model, batches


def _grasp_model_and_data(arch):
    if arch == "llama":
        return _tiny_llama()
    model, _ = wrapped(arch)
    return model, calib_batches(arch)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_grasp_forward_over_reverse_equals_double_backward(arch):
    """The two exact ways to H g agree (llama: SiLU runs decomposed for forward-mode AD)."""
    from sparseft.scoring import grasp_scores

    model, batches = _grasp_model_and_data(arch)
    layers = model.sparse_layers()
    fwd = grasp_scores(layers, model=model, data=batches, micro_batch=1, hg_method="forward-over-reverse")
    dbl = grasp_scores(layers, model=model, data=batches, micro_batch=1, hg_method="double-backward")
    assert_scores_close(fwd, [dbl[n] for n in model.target_names], model.target_names, rtol=1e-4, atol_frac=1e-5)
    assert any(float(fwd[n].abs().max()) > 0 for n in fwd)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_grasp_block_by_block_equals_the_whole_model_pass(arch, monkeypatch):
    """The second-order pass that rebuilds one block at a time (bert: with the pooler
    outside the blocks, so the part before the first block runs again) gives the scores
    of one forward-with-tangents and one backward of the whole model."""
    from sparseft.scoring import grasp

    model, batches = _grasp_model_and_data(arch)
    layers = model.sparse_layers()
    use_cache = [getattr(m.config, "use_cache", None) for m in model.modules() if hasattr(m, "config")]
    passes = []
    block_pass = grasp._second_order_pass
    monkeypatch.setattr(grasp, "_second_order_pass", lambda *a: passes.append(a) or block_pass(*a))
    by_block = grasp.grasp_scores(layers, model=model, data=batches, micro_batch=1, hg_method="forward-over-reverse")
    assert len(passes) == 5  # 2 + 3 examples, one group
    assert use_cache == [getattr(m.config, "use_cache", None) for m in model.modules() if hasattr(m, "config")]
    monkeypatch.setattr(grasp, "_blocks", lambda *a: None)
    whole = grasp.grasp_scores(layers, model=model, data=batches, micro_batch=1, hg_method="forward-over-reverse")
    assert len(passes) == 5
    assert_scores_close(by_block, [whole[n] for n in model.target_names], model.target_names, rtol=1e-4, atol_frac=1e-5)


def test_grasp_falls_back_to_double_backward(monkeypatch):
    from sparseft.scoring import grasp

    model, _ = wrapped("gpt2")
    layers = model.sparse_layers()
    batches = calib_batches("gpt2")
    expected = grasp.grasp_scores(layers, model=model, data=batches, hg_method="double-backward")

    def unsupported(*args, **kwargs):
        raise NotImplementedError("Trying to use forward AD with aten::something_backward that does not support it.")

    monkeypatch.setattr(grasp, "_hg_forward_over_reverse", unsupported)
    with pytest.warns(RuntimeWarning, match="double backward"):
        got = grasp.grasp_scores(layers, model=model, data=batches)
    assert all(torch.equal(got[n], expected[n]) for n in layers)
    with pytest.raises(NotImplementedError):
        grasp.grasp_scores(layers, model=model, data=batches, hg_method="forward-over-reverse")


def test_calibration_shows_progress_over_its_batches(capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    batches = calib_batches("bert")
    assert len(batches) >= 2
    get_sparse_model(build_bert(), SparseConfig(method="gradient", density=0.05), calibration_data=batches)
    err = capsys.readouterr().err
    assert "calibration" in err and f"0/{len(batches)} " in err


# ------------------------------------------------------------------ micro-batch from a memory budget
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_auto_micro_batch_keeps_the_scores_of_micro_batch_one(arch):
    model, _ = wrapped(arch)
    batches = calib_batches(arch)
    layers = model.sparse_layers()
    one = compute_scores("snip", layers, model=model, data=batches, micro_batch=1)
    for budget in (1e-6, 1e-3, 1e3):  # every example alone, some together, whole batches
        auto = compute_scores("snip", layers, model=model, data=batches, micro_batch="auto", memory_mb=budget)
        assert_scores_close(auto, [one[n] for n in model.target_names], model.target_names, rtol=1e-4,
                            atol_frac=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_auto_micro_batch_keeps_its_activations_within_the_budget(arch):
    from sparseft.scoring.calibration import resolve_micro_batch, saved_activation_bytes, split_examples

    model, _ = wrapped(arch)
    batches = [calib_batches(arch)[1]] * 2 + [make_batch(batch=6, seq=9, seed=3)]  # the last: the longest
    if arch == "bert":
        batches[2]["labels"] = torch.arange(6) % 3
    else:
        batches[2]["labels"] = batches[2]["input_ids"].masked_fill(batches[2]["attention_mask"] == 0, -100)
    longest = batches[2]
    per_example = saved_activation_bytes(model, next(split_examples(longest)))
    assert per_example > 0
    assert resolve_micro_batch(model, batches, 5) == 5  # a number is kept
    assert resolve_micro_batch(model, batches, "auto", memory_mb=1e-6) == 1
    assert resolve_micro_batch(model, batches, "auto", memory_mb=1e3) == 6  # at most the largest batch
    for k in (2, 3, 4):
        budget_mb = (k + 0.5) * per_example / 2**20
        assert resolve_micro_batch(model, batches, "auto", memory_mb=budget_mb) == k
        # the bound docs/scoring.md states: a micro-batch of k of the longest examples keeps at most the budget
        piece = {key: v[:k] for key, v in longest.items()}
        assert saved_activation_bytes(model, piece) <= budget_mb * 2**20


def test_auto_is_the_default_and_grasp_takes_a_quarter_of_the_budget(monkeypatch):
    from sparseft.scoring import grasp
    from sparseft.scoring.calibration import saved_activation_bytes, split_examples

    assert SparseConfig().calibration.micro_batch == "auto"
    assert CalibrationOptions(micro_batch="auto", memory_mb=64).memory_mb == 64
    with pytest.raises(ConfigError, match="memory_mb"):
        CalibrationOptions(memory_mb=0)
    model, _ = wrapped("bert")
    batches = calib_batches("bert")
    per_example = saved_activation_bytes(model, next(split_examples(batches[1])))
    seen = []
    real = grasp._pieces
    monkeypatch.setattr(grasp, "_pieces", lambda m, b, micro: seen.append(micro) or real(m, b, micro))
    one = grasp.grasp_scores(model.sparse_layers(), model=model, data=batches, micro_batch=1)
    # a first-order budget of 8.5 examples: grasp takes a quarter of it, 2 examples per pass
    auto = grasp.grasp_scores(model.sparse_layers(), model=model, data=batches, micro_batch="auto",
                              memory_mb=8.5 * per_example / 2**20)
    assert seen[-1] == 2
    assert_scores_close(auto, [one[n] for n in model.target_names], model.target_names, rtol=1e-4, atol_frac=1e-5)
