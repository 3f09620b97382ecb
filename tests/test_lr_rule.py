"""The default learning rate (lr="auto"): the rule's values, and that train() and the CLI use it."""
import json

import pytest
import torch

import sparseft
from conftest import tiny_bert_classifier, toy_batches
from sparseft import lr_rule
from sparseft.lr_rule import REF_DENSITY, RULES, default_lr, rule_lr
from sparseft.train import TrainingArguments, create_optimizer, train


@pytest.mark.parametrize("method,family", [("random", "data-free"), ("gradient", "gradient"), ("id3", "gradient"),
                                           ("dst", "gradient"), ("grow-drop", "grow-drop")])
def test_rule_at_the_reference_density_is_the_fitted_rate(method, family):
    assert rule_lr(method, REF_DENSITY) == pytest.approx(RULES[family][0])


def test_rule_values_at_the_measured_budgets():
    """random masking on all-linear MiniLM-L6 at LoRA-rank-equivalent budgets 1, 4, 16."""
    targeted = 10_764_288
    for entries, expected in ((42_240, 1.768e-2), (168_960, 6.25e-3), (675_840, 2.210e-3)):
        assert rule_lr("random", entries / targeted) == pytest.approx(expected, rel=1e-3)
    # grow-drop: a quarter of random masking's rate
    for entries, expected in ((42_240, 4.419e-3), (168_960, 1.5625e-3), (675_840, 5.524e-4), (2_703_360, 1.953e-4)):
        assert rule_lr("grow-drop", entries / targeted) == pytest.approx(expected, rel=1e-3)
    # gradient masks: four times the budget, half the rate
    for entries, expected in ((42_240, 4e-3), (168_960, 2e-3), (675_840, 1e-3)):
        assert rule_lr("gradient", entries / targeted) == pytest.approx(expected, rel=1e-3)


def test_rule_follows_the_power_law_and_is_clipped(monkeypatch):
    at_ref, exponent, _ = RULES["data-free"]
    # 4x the budget (e.g. LoRA rank 4 -> 16): the rate shrinks by 4 ** exponent
    assert rule_lr("random", 4 * REF_DENSITY) == pytest.approx(at_ref * 4.0 ** -exponent)
    rates = [rule_lr("random", d) for d in (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)]
    assert rates == sorted(rates, reverse=True)
    monkeypatch.setitem(RULES, "data-free", (1e-2, 2.0, 0.0))
    assert rule_lr("random", REF_DENSITY / 2) == pytest.approx(4e-2)
    assert rule_lr("random", REF_DENSITY * 1e-3) == lr_rule.LR_MAX
    assert rule_lr("random", 1.0) == lr_rule.LR_MIN


def test_a_model_larger_than_the_reference_gets_a_smaller_gradient_family_rate(monkeypatch):
    at_ref, _, size_exponent = RULES["gradient"]
    assert size_exponent > 0
    ten_times = 10 * lr_rule.REF_TARGETED
    assert rule_lr("gradient", REF_DENSITY, ten_times) == pytest.approx(at_ref * 10.0 ** -size_exponent)
    assert rule_lr("gradient", REF_DENSITY, lr_rule.REF_TARGETED // 100) == pytest.approx(at_ref)  # not measured below
    assert rule_lr("random", REF_DENSITY, ten_times) == pytest.approx(RULES["data-free"][0])  # no size term
    monkeypatch.setitem(RULES, "gradient", (1e-3, 0.0, 1.0))
    assert rule_lr("gradient", 0.01, 2 * lr_rule.REF_TARGETED) == pytest.approx(5e-4)
    with pytest.raises(sparseft.ConfigError, match="targeted weights"):
        rule_lr("gradient", 0.01, 0)


def test_the_rule_refuses_what_it_does_not_cover():
    with pytest.raises(sparseft.ConfigError, match="no default learning rate"):
        rule_lr("lora", 0.01)
    with pytest.raises(sparseft.ConfigError, match="needs the sparse model"):
        default_lr(sparseft.SparseConfig(method="random", match_lora_rank=4))
    with pytest.raises(ValueError, match="positive number or 'auto'"):
        TrainingArguments(lr="fast")


def test_a_budget_in_entries_or_lora_rank_is_turned_into_its_density(monkeypatch):
    config = sparseft.SparseConfig(method="random", match_lora_rank=2)
    model = sparseft.get_sparse_model(tiny_bert_classifier(), config)
    shapes = model.target_shapes()
    density = sum(2 * (o + i) for o, i in shapes.values()) / sum(o * i for o, i in shapes.values())
    assert default_lr(config, model) == pytest.approx(rule_lr("random", density))
    monkeypatch.setattr(lr_rule, "REF_TARGETED", 1)  # the tiny model now counts as larger than the reference
    gradient = sparseft.SparseConfig(method="gradient", match_lora_rank=2)
    targeted = sum(o * i for o, i in shapes.values())
    assert default_lr(gradient, model) == pytest.approx(rule_lr("gradient", density, targeted))
    assert default_lr(gradient, model) < rule_lr("gradient", density, 1)
    assert default_lr(sparseft.SparseConfig(method="gradient", density=0.05)) == pytest.approx(rule_lr("gradient", 0.05))
    assert sparseft.default_lr is default_lr


def test_train_uses_the_rule_when_no_rate_is_given():
    model = sparseft.get_sparse_model(tiny_bert_classifier(), sparseft.SparseConfig(method="random", density=0.03))
    args = TrainingArguments(max_steps=2, warmup_ratio=0.0, progress=False)
    assert args.lr == "auto"
    result = train(model, toy_batches(2, 4), args)
    expected = default_lr(model.sparse_config, model)  # the density of the budget rounded to whole entries
    assert expected == pytest.approx(rule_lr("random", 0.03), rel=1e-3)
    assert result.lr == expected and create_optimizer(model).param_groups[0]["lr"] == expected
    given = train(model, toy_batches(2, 4), TrainingArguments(lr=1e-4, max_steps=1, progress=False))
    assert given.lr == 1e-4


def test_auto_needs_a_sparse_model():
    with pytest.raises(sparseft.ConfigError, match="needs a SparseModel"):
        lr_rule.resolve_lr("auto", tiny_bert_classifier())


def test_the_cli_uses_the_rule_and_lr_overrides_it(tmp_path):
    from _tiny import tiny_bert_dir
    from sparseft.app.cli import main

    model_dir = tiny_bert_dir(tmp_path / "model")
    lines = ["text,label"] + [f"a {w} film,{w}" for w in ("good", "bad") * 8]
    for name in ("train", "eval"):
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
    common = ["train", "--model", str(model_dir), "--train-file", str(tmp_path / "train.csv"),
              "--eval-file", str(tmp_path / "eval.csv"), "--batch-size", "8", "--max-steps", "1",
              "--method", "gradient", "--density", "0.02", "--calib-examples", "8", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "auto")]) == 0
    metrics = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert metrics["lr"] == pytest.approx(rule_lr("gradient", 0.02), rel=1e-2) and metrics["lr_given"] == "auto"
    assert main([*common, "--lr", "0.0003", "--out", str(tmp_path / "given")]) == 0
    metrics = json.loads((tmp_path / "given" / "metrics.json").read_text())
    assert metrics["lr"] == pytest.approx(3e-4) and metrics["lr_given"] == pytest.approx(3e-4)
