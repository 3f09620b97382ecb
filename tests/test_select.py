"""Budgets, per-layer allocation, top-k and target selection."""
from __future__ import annotations

import math
import re

import pytest
import torch

from sparseft import ConfigError, SparseConfig, get_sparse_model
from sparseft.delta import SparseDeltaLayer
from sparseft.inject import find_target_modules
from sparseft.select import allocate_per_layer, lora_equivalent_params, resolve_budget, select_topk

SHAPES = {"a": (8, 4), "b": (3, 10), "c": (1, 7)}  # (out, in)
TOTAL = 8 * 4 + 3 * 10 + 1 * 7


# -- budgets ------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.01, 0.1, 0.33, 1.0])
def test_density_budget(density):
    assert resolve_budget(SparseConfig(density=density), SHAPES) == max(1, round(density * TOTAL))


def test_num_params_budget():
    assert resolve_budget(SparseConfig(num_params=17), SHAPES) == 17
    with pytest.raises(ConfigError, match="exceeds"):
        resolve_budget(SparseConfig(num_params=TOTAL + 1), SHAPES)


def test_match_lora_rank_budget():
    assert lora_equivalent_params(SHAPES, 2) == 2 * (12 + 13 + 8)
    assert resolve_budget(SparseConfig(match_lora_rank=1), SHAPES) == 12 + 13 + 8
    with pytest.raises(ConfigError, match="exceeds"):
        resolve_budget(SparseConfig(match_lora_rank=10), SHAPES)


def lora_trainable_count(model, target_names, rank):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_names), lora_dropout=0.0)
    lora_model = peft.get_peft_model(model, cfg)
    # only the LoRA matrices: the task head is counted apart from the sparse budget
    return sum(p.numel() for n, p in lora_model.named_parameters() if p.requires_grad and "lora_" in n)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_match_lora_rank_equals_peft_lora_count(arch, bert_factory, gpt2_factory):
    factory = bert_factory if arch == "bert" else gpt2_factory
    rank = 2
    model = get_sparse_model(factory(), SparseConfig(match_lora_rank=rank))
    expected = sum(rank * (o + i) for o, i in model.target_shapes().values())
    assert model.num_sparse_params() == expected
    assert lora_trainable_count(factory(), model.target_names, rank) == expected


# -- per-layer allocation -----------------------------------------------------------
def test_allocate_per_layer_sums_exactly_random():
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 8, (1,), generator=gen))
        sizes = {f"l{i}": int(torch.randint(1, 500, (1,), generator=gen)) for i in range(n)}
        total = sum(sizes.values())
        budget = int(torch.randint(0, total + 1, (1,), generator=gen))
        shares = allocate_per_layer(sizes, budget)
        assert list(shares) == list(sizes)
        assert sum(shares.values()) == budget, (sizes, budget, shares)
        for name, share in shares.items():
            assert 0 <= share <= sizes[name]
            assert abs(share - budget * sizes[name] / total) < 1.0 + 1e-9


def test_allocate_per_layer_ties_go_to_earlier_layer():
    assert allocate_per_layer({"x": 10, "y": 10, "z": 10}, 1) == {"x": 1, "y": 0, "z": 0}
    assert allocate_per_layer({"x": 10, "y": 10, "z": 10}, 2) == {"x": 1, "y": 1, "z": 0}
    with pytest.raises(ConfigError, match="exceeds"):
        allocate_per_layer({"x": 3}, 4)


# -- top-k --------------------------------------------------------------------------
def brute_force_topk(scores: dict[str, torch.Tensor], k: int) -> dict[str, list[int]]:
    """Sort every entry by (-score, layer order, index); NaN ranks lowest (below -inf)."""
    entries = []
    for layer_order, (name, s) in enumerate(scores.items()):
        for i, v in enumerate(s.tolist()):
            nan = math.isnan(v)
            entries.append((nan, 0.0 if nan else -v, layer_order, i, name))
    entries.sort(key=lambda e: e[:4])
    chosen = {name: [] for name in scores}
    for *_, i, name in entries[:k]:
        chosen[name].append(i)
    return {name: sorted(v) for name, v in chosen.items()}


def check_topk(scores, k):
    got = select_topk(scores, k, "global")
    expected = brute_force_topk(scores, k)
    assert list(got) == list(scores)
    for name in scores:
        assert got[name].dtype == torch.int32
        assert got[name].tolist() == expected[name], (name, k)


def test_global_topk_matches_brute_force_continuous():
    gen = torch.Generator().manual_seed(1)
    scores = {"a": torch.randn(40, generator=gen), "b": torch.randn(13, generator=gen), "c": torch.randn(1, generator=gen)}
    for k in (0, 1, 5, 27, 53, 54):
        check_topk(scores, k)


def test_global_topk_ties_broken_by_layer_then_index():
    gen = torch.Generator().manual_seed(2)
    # few distinct values: many ties across and within layers
    scores = {n: torch.randint(-2, 3, (size,), generator=gen).float() for n, size in (("a", 30), ("b", 17), ("c", 25))}
    for k in range(0, 73):
        check_topk(scores, k)


def test_global_topk_special_values():
    scores = {
        "a": torch.tensor([0.0, -0.0, float("nan"), 1e-38, -1e-38, float("inf")]),
        "b": torch.tensor([-0.0, float("-inf"), 0.0, float("nan"), 3.0, -3.0]),
    }
    for k in range(0, 13):
        check_topk(scores, k)


@pytest.mark.parametrize("min_total", [0, None])
def test_global_topk_sampled_threshold_matches_radix(monkeypatch, min_total):
    import sparseft.select as select

    gen = torch.Generator().manual_seed(4)
    scores = {"a": torch.randn(384 * 384, generator=gen), "b": torch.randn(1536 * 384, generator=gen).abs(),
              "c": torch.randint(-2, 3, (384 * 384,), generator=gen).float()}
    scores["a"][::7] = float("nan")
    scores["b"][5000:9000] = float("inf")
    if min_total is not None:
        monkeypatch.setattr(select, "SAMPLED_MIN_TOTAL", min_total)
    for k in (1, 3999, 4000, 4001, 30000, 200000, 700000):
        monkeypatch.setattr(select, "_kth_largest_key_sampled", lambda *a: None)
        want = select.select_topk(scores, k, "global")
        monkeypatch.undo()
        if min_total is not None:
            monkeypatch.setattr(select, "SAMPLED_MIN_TOTAL", min_total)
        got = select.select_topk(scores, k, "global")
        for n in scores:
            assert torch.equal(got[n], want[n]), (k, n)
    small = {"x": torch.tensor([1.0, float("nan"), 1.0, 2.0]), "y": torch.tensor([2.0, -1.0])}
    for k in range(0, 7):
        check_topk(small, k)


def sorted_topk(scores, k):
    """The reference: one stable descending sort of all scores (NaN as -inf), layer order kept."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float().nan_to_num(nan=float("-inf")) for n in names])
    chosen = torch.sort(flat, descending=True, stable=True).indices[:k]
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = torch.sort(chosen[(chosen >= start) & (chosen < start + size)] - start).values.to(torch.int32)
        start += size
    return out


def test_global_topk_large_cases_match_a_full_sort():
    """Large inputs (the sampled-guess path) with masked entries, NaN, a clump of equal top
    scores, heavy ties, and a sample that lures the first guess too high."""
    gen = torch.Generator().manual_seed(3)
    big = {"a": torch.randn(384 * 384, generator=gen).abs(), "b": torch.randn(1536 * 384, generator=gen).abs() * 2,
           "c": torch.randint(0, 4, (384 * 384,), generator=gen).float()}
    big["a"][torch.randperm(big["a"].numel(), generator=gen)[:5000]] = float("-inf")  # already indexed
    big["b"][:1000] = float("nan")
    big["b"][1000:2000] = 1e9
    lured = torch.zeros(300000)
    lured[::5] = 1.0  # exactly the sampled entries (stride 5) are high
    for scores, ks in ((big, (1, 999, 1000, 1001, 20000, 400000, 884736 - 500)), ({"z": lured}, (59999, 60000, 70000))):
        for k in ks:
            got, want = select_topk(scores, k, "global"), sorted_topk(scores, k)
            for n in scores:
                assert torch.equal(got[n], want[n]), (k, n)


def test_topk_budget_too_large_and_bad_selection():
    scores = {"a": torch.rand(4)}
    with pytest.raises(ConfigError, match="exceeds"):
        select_topk(scores, 5)
    with pytest.raises(ConfigError, match="unknown selection"):
        select_topk(scores, 2, "weird")


def test_per_layer_topk():
    gen = torch.Generator().manual_seed(3)
    scores = {"a": torch.randn(50, generator=gen), "b": torch.randn(30, generator=gen), "c": torch.randn(20, generator=gen)}
    budget = 17
    got = select_topk(scores, budget, "per-layer")
    shares = allocate_per_layer({n: s.numel() for n, s in scores.items()}, budget)
    assert sum(v.numel() for v in got.values()) == budget
    for name, s in scores.items():
        assert got[name].numel() == shares[name]
        assert got[name].tolist() == brute_force_topk({name: s}, shares[name])[name]


# -- target selection ---------------------------------------------------------------
GPT2_LINEAR = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
BERT_LINEAR = {
    "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense", "intermediate.dense", "output.dense",
}


def test_all_linear_gpt2_leaves_out_lm_head(tiny_gpt2):
    names = find_target_modules(tiny_gpt2, "all-linear")
    assert "lm_head" not in names
    expected = {f"transformer.h.{i}.{s}" for i in range(2) for s in GPT2_LINEAR}
    assert set(names) == expected


def test_all_linear_bert_leaves_out_classifier(tiny_bert):
    model = get_sparse_model(tiny_bert, SparseConfig(density=0.1))
    names = model.target_names
    assert not any(n.startswith("classifier") for n in names)
    expected = {f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in BERT_LINEAR} | {"bert.pooler.dense"}
    assert set(names) == expected
    assert model.modules_to_save == ["classifier"]
    assert all(p.requires_grad for p in model.model.classifier.parameters())
    assert not isinstance(model.model.classifier, SparseDeltaLayer)


def test_list_patterns(tiny_bert):
    names = find_target_modules(tiny_bert, ["query", "value"])
    assert names == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    # a full dotted name also matches
    assert find_target_modules(tiny_bert, ["bert.encoder.layer.1.intermediate.dense"]) == ["bert.encoder.layer.1.intermediate.dense"]


def test_list_pattern_matches_whole_name_parts_only(tiny_bert):
    # list entries match whole dotted components from the end, never a substring like "ense"
    with pytest.raises(ConfigError, match="target_modules"):
        find_target_modules(tiny_bert, ["ense"])


def test_regex_pattern(tiny_bert):
    names = find_target_modules(tiny_bert, r".*layer\.0\.attention\.self\.(query|key)")
    assert names == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key"]


def test_exclude_modules(tiny_bert):
    names = find_target_modules(tiny_bert, "all-linear", exclude_modules=["pooler.dense", "key"])
    assert "bert.pooler.dense" not in names
    assert not any(n.endswith(".key") for n in names)
    assert any(n.endswith(".query") for n in names)


@pytest.mark.parametrize("targets", [["nonexistent"], r"nothing\.here", ["embeddings"]])
def test_no_match_raises_config_error(tiny_bert, targets):
    with pytest.raises(ConfigError, match=re.escape("target_modules")):
        find_target_modules(tiny_bert, targets)
    with pytest.raises(ConfigError, match="target_modules"):
        get_sparse_model(tiny_bert, SparseConfig(density=0.1, target_modules=targets))


def test_already_wrapped_model_refused(tiny_bert):
    model = get_sparse_model(tiny_bert, SparseConfig(density=0.1))
    with pytest.raises(ConfigError, match="already"):
        get_sparse_model(model, SparseConfig(density=0.1))
    with pytest.raises(ConfigError, match="already carries a sparse delta"):
        find_target_modules(model.model, ["query"])


# -- budgets on real (tiny) models --------------------------------------------------
@pytest.mark.parametrize("selection", ["global", "per-layer"])
@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_get_sparse_model_spends_budget_exactly(tiny_gpt2, selection, method):
    cfg = SparseConfig(method=method, density=0.05, selection=selection)
    model = get_sparse_model(tiny_gpt2, cfg)
    total = model.num_targeted_weights()
    assert model.num_sparse_params() == round(0.05 * total)
    summary = model.trainable_summary()
    assert summary["sparse_params"] == model.num_sparse_params()
    assert summary["head_params"] == 0  # GPT-2 has no task head
    for layer in model.sparse_layers().values():
        idx = layer.indices
        assert idx.dtype == torch.int32
        if idx.numel() > 1:
            assert bool((idx[1:] > idx[:-1]).all())
    if selection == "per-layer":
        shares = allocate_per_layer({n: l.weight.numel() for n, l in model.sparse_layers().items()}, model.num_sparse_params())
        assert {n: l.num_entries for n, l in model.sparse_layers().items()} == shares


def test_num_params_budget_on_model(tiny_bert):
    model = get_sparse_model(tiny_bert, SparseConfig(num_params=123))
    assert model.num_sparse_params() == 123
    # the classifier is counted apart from the sparse budget
    assert model.num_head_params() == sum(p.numel() for p in model.model.classifier.parameters())


def _chosen_and_rest(model):
    chosen, rest = [], []
    for layer in model.sparse_layers().values():
        mags = layer.weight.detach().abs().reshape(-1)
        mask = torch.zeros(mags.numel(), dtype=torch.bool)
        mask[layer.indices.long()] = True
        chosen.append(mags[mask])
        rest.append(mags[~mask])
    return torch.cat(chosen), torch.cat(rest)


def test_magnitude_picks_largest_and_smallest(bert_factory):
    large = get_sparse_model(bert_factory(), SparseConfig(method="magnitude", num_params=50))
    chosen, rest = _chosen_and_rest(large)
    assert chosen.numel() == 50 and chosen.min() >= rest.max()
    small = get_sparse_model(bert_factory(), SparseConfig(method="magnitude", num_params=50, magnitude_order="smallest"))
    chosen, rest = _chosen_and_rest(small)
    assert chosen.numel() == 50 and chosen.max() <= rest.min()


def test_random_selection_is_seeded(bert_factory):
    a = get_sparse_model(bert_factory(), SparseConfig(method="random", density=0.05, seed=1))
    b = get_sparse_model(bert_factory(), SparseConfig(method="random", density=0.05, seed=1))
    c = get_sparse_model(bert_factory(), SparseConfig(method="random", density=0.05, seed=2))
    ia = {n: l.indices.tolist() for n, l in a.sparse_layers().items()}
    assert ia == {n: l.indices.tolist() for n, l in b.sparse_layers().items()}
    assert ia != {n: l.indices.tolist() for n, l in c.sparse_layers().items()}


@pytest.mark.parametrize("selection", ["global", "per-layer"])
@pytest.mark.parametrize("budget", [0, 1, 7, 150, 400, 799, 800])
def test_streaming_topk_equals_select_topk(selection, budget):
    from sparseft.select import StreamingTopK

    gen = torch.Generator().manual_seed(1)
    scores = {"a": torch.randn(300, generator=gen).round(), "b": torch.randn(200, generator=gen),
              "c": torch.randn(250, generator=gen).round(decimals=1), "d": torch.zeros(50)}  # many ties
    scores["b"][::7] = float("nan")
    expected = select_topk(scores, budget, selection)
    stream = StreamingTopK({n: s.numel() for n, s in scores.items()}, budget, selection)
    for n, s in scores.items():
        stream.add(n, s.clone())
    got = stream.result()
    assert all(torch.equal(got[n], expected[n]) for n in scores), (got, expected)


def test_streaming_topk_wants_every_layer_in_order():
    from sparseft.select import StreamingTopK

    stream = StreamingTopK({"a": 3, "b": 3}, 2)
    with pytest.raises(ValueError, match="order"):
        stream.add("b", torch.zeros(3))
    stream.add("a", torch.zeros(3))
    with pytest.raises(ValueError, match="scored"):
        stream.result()


@pytest.mark.parametrize("method", ["random", "magnitude"])
@pytest.mark.parametrize("selection", ["global", "per-layer"])
@pytest.mark.parametrize("granularity", ["entry", "tile16"])
def test_layerwise_scorers_select_one_layer_at_a_time_with_the_same_result(method, selection, granularity,
                                                                             bert_factory, monkeypatch):
    from sparseft.methods import static
    from sparseft.scoring import compute_scores
    from sparseft.tiles import select_entries

    cfg = SparseConfig(method=method, density=0.05, selection=selection, granularity=granularity, seed=3)
    model = get_sparse_model(bert_factory(hidden=32), cfg)
    layers = model.sparse_layers()
    scored = []
    real = static.compute_scores
    monkeypatch.setattr(static, "compute_scores", lambda m, ls, **kw: scored.append(list(ls)) or real(m, ls, **kw))
    streamed = static.score_and_select(model)
    assert scored == [[name] for name in layers]  # one layer's scores at a time
    whole = select_entries(compute_scores(method, layers, seed=3, order="largest"), static.weight_shapes(layers),
                           resolve_budget(cfg, model.target_shapes()), selection, granularity)
    assert streamed.keys() == whole.keys()
    for name in whole:
        assert torch.equal(streamed[name], whole[name]), name
