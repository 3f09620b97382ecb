"""Baselines (LoRA, full, SHiRA, Super-Tuning) on tiny models: same targets, counted the same way."""
import json

import pytest
import torch

from sparseft import SparseConfig, get_sparse_model
from sparseft.app.baselines import BaselineConfig, get_baseline_model, resolve_rank
from sparseft.config import ConfigError
from sparseft.train import TrainingArguments, train

pytest.importorskip("peft")


def _loader(n_batches=3, seed=0):
    from conftest import make_batch

    out = []
    for i in range(n_batches):
        b = make_batch(batch=4, seq=6, seed=seed + i)
        b["labels"] = torch.tensor([0, 1, 2, 1])
        out.append(b)
    return out


@pytest.mark.parametrize("method", ["lora", "shira"])
def test_rank_baselines_match_the_sparse_budget(bert_factory, method):
    sparse = get_sparse_model(bert_factory(), SparseConfig(match_lora_rank=2, modules_to_save=["classifier"]))
    base = get_baseline_model(bert_factory(), BaselineConfig(method=method, match_lora_rank=2,
                                                             modules_to_save=["classifier"]))
    s, b = sparse.trainable_summary(), base.trainable_summary()
    assert b["sparse_params"] == s["sparse_params"]  # r*(in+out) per targeted matrix, same targets
    assert b["head_params"] == s["head_params"] == 32 * 3 + 3
    assert b["targeted_weights"] == s["targeted_weights"]
    assert sorted(base.target_names) == sorted(sparse.target_names)


@pytest.mark.parametrize("method", ["lora", "full", "shira", "supertuning"])
def test_baselines_start_at_the_base_model_and_train(bert_factory, batch, method):
    reference = bert_factory()
    model = get_baseline_model(bert_factory(), BaselineConfig(method=method, match_lora_rank=2,
                                                              modules_to_save=["classifier"]))
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, reference(**batch).logits, atol=1e-5)
    opt = model.create_optimizer(lr=1e-2, head_lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.trainable_named() if not model._is_head(n)}
    result = train(model, _loader(), TrainingArguments(lr=1e-2, max_steps=3, progress=False, warmup_ratio=0),
                   optimizer=opt)
    assert result.steps == 3
    after = dict(model.trainable_named())
    assert any(not torch.equal(before[n], after[n]) for n in before), "no body parameter moved"


def test_full_counts_everything_but_the_head(bert_factory):
    model = get_baseline_model(bert_factory(), BaselineConfig(method="full", modules_to_save=["classifier"]))
    total = sum(p.numel() for p in bert_factory().parameters())
    s = model.trainable_summary()
    assert s["head_params"] == 32 * 3 + 3 and s["sparse_params"] == total - s["head_params"]


def test_rank_from_density_and_bad_budgets():
    shapes = {"a": (64, 32), "b": (32, 32)}
    assert resolve_rank(BaselineConfig(density=1.0), shapes) == round((64 * 32 + 32 * 32) / (96 + 64))
    assert resolve_rank(BaselineConfig(density=1e-6), shapes) == 1
    with pytest.raises(ConfigError, match="exactly one budget"):
        BaselineConfig(lora_rank=2, density=0.1)
    with pytest.raises(ConfigError, match="not known"):
        BaselineConfig(method="dora")


def test_lora_on_a_causal_lm_leaves_the_output_head_out(gpt2_factory):
    model = get_baseline_model(gpt2_factory(), BaselineConfig(method="lora", lora_rank=1))
    assert "lm_head" not in model.target_names and model.trainable_summary()["head_params"] == 0


def test_lora_adapter_is_saved(tmp_path, bert_factory):
    model = get_baseline_model(bert_factory(), BaselineConfig(method="lora", lora_rank=1, modules_to_save=["classifier"]))
    size = model.save(tmp_path / "adapter")
    assert size > 0 and json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 1
