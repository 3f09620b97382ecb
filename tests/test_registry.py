"""The method registry: everything that lists methods is derived from it, and each
method's declared capabilities hold for the real implementation."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sparseft
from conftest import build_bert, make_batch
from sparseft import registry
from sparseft.config import ConfigError, SparseConfig
from sparseft.methods import DynamicMask, StaticMask, get_method
from sparseft.scoring import SCORERS, compute_scores

DOCS = Path(__file__).resolve().parent.parent / "docs" / "methods.md"
ALL = list(registry.METHODS)


def test_docs_methods_table_is_generated_from_the_registry():
    assert DOCS.read_text() == registry.methods_doc(), (
        "docs/methods.md is out of date: python -m sparseft.registry > docs/methods.md")


def test_every_method_is_known_to_the_config_and_nothing_else_is():
    for name in ALL:
        assert SparseConfig(method=name).method == name
    with pytest.raises(ConfigError, match="choose one of " + ", ".join(ALL)):
        SparseConfig(method="nope")


@pytest.mark.parametrize("name", ALL)
def test_dynamic_schedule_is_accepted_exactly_where_declared(name):
    if registry.get(name).can_run_dynamic:
        assert isinstance(get_method(SparseConfig(method=name, schedule="dynamic")), DynamicMask)
    else:
        with pytest.raises(ConfigError, match="cannot rescore"):
            SparseConfig(method=name, schedule="dynamic")


@pytest.mark.parametrize("name", ALL)
def test_get_method_builds_the_registered_implementation(name):
    spec = registry.get(name)
    method = get_method(SparseConfig(method=name))
    if spec.kind == registry.TRAINING_TIME:
        assert type(method) is spec.load()
    else:
        assert type(method) is StaticMask and SCORERS[name] is spec.load()


def test_scorers_are_exactly_the_registered_scorers():
    assert list(SCORERS) == list(registry.names(registry.SCORER))
    assert set(registry.names(registry.SCORER)) | set(registry.names(registry.TRAINING_TIME)) == set(ALL)


def _layers(name):
    model = sparseft.get_sparse_model(build_bert(), SparseConfig(method="random", num_params=10))
    return model, model.sparse_layers()


@pytest.mark.parametrize("name", registry.names(registry.SCORER))
def test_declared_data_needs_hold(name):
    """needs_calibration: refuses to score without data and scores with it. data_free:
    scores without data or a model. Others (synflow): need the model, not data."""
    spec = registry.get(name)
    model, layers = _layers(name)
    if spec.needs_calibration:
        with pytest.raises(ValueError, match="calibration"):
            compute_scores(name, layers, model=model, data=None)
        batch = {**make_batch(), "labels": torch.tensor([0, 1])}
        scores = compute_scores(name, layers, model=model, data=[batch])
    elif spec.data_free:
        scores = compute_scores(name, layers)
    else:
        with pytest.raises(ValueError, match="needs the model"):
            compute_scores(name, layers)
        scores = compute_scores(name, layers, model=model)
    assert set(scores) == set(layers)
    assert all(scores[n].numel() == layers[n].weight.numel() for n in layers)


def test_default_lr_rule_family_comes_from_the_registry():
    from sparseft import lr_rule
    from sparseft.app.runner import default_lr

    assert lr_rule.FAMILY == {name: spec.lr_family for name, spec in registry.METHODS.items()}
    for name in ALL:
        assert registry.get(name).lr_family in lr_rule.RULES
        assert lr_rule.rule_lr(name, 0.01) > 0
        assert default_lr(name) == lr_rule.AUTO  # the application leaves sparse methods to the rule


def test_cli_method_choices_and_help_come_from_the_registry(capsys):
    from sparseft.app.options import BASELINE_METHODS, build_parser

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices["train"]._actions if a.dest == "method")
    assert list(train.choices) == ALL + list(BASELINE_METHODS)
    for spec in registry.METHODS.values():
        assert f"{spec.name} (" in train.help and spec.description in train.help
    schedule = next(a for a in parser._subparsers._group_actions[0].choices["train"]._actions if a.dest == "schedule")
    assert list(schedule.choices) == list(registry.SCHEDULES)


def test_declared_options_are_config_fields():
    config = SparseConfig()
    for spec in registry.METHODS.values():
        for option in spec.options:
            owner, _, name = option.rpartition(".")
            assert hasattr(getattr(config, owner) if owner else config, name), (spec.name, option)
