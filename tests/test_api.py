"""The PEFT-grade SparseModel surface: explicit delegation, peft's calls (get_base_model,
get_nb_trainable_parameters, disable_adapter, from_pretrained(is_trainable=...),
push_to_hub), the method restored on load, and an adapter folder that neither
transformers nor peft mistakes for one of theirs."""
import json

import pytest
import torch

import sparseft
from conftest import build_bert, build_gpt2, make_batch, tiny_one_layer_bert, toy_batches
from sparseft.model import (CONFIG_NAME, LEGACY_CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, AdapterError,
                            SparseModel, file_sha256)
from sparseft.train import TrainingArguments, train


def trained(model_fn=build_bert, **cfg):
    model = sparseft.get_sparse_model(model_fn(), sparseft.SparseConfig(**{"density": 0.1, **cfg}))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.values.copy_(torch.randn(layer.values.shape, generator=gen) * 0.1)
    return model


def dynamic_config(**kw):
    return dict(method="gradient", density=0.05, schedule="dynamic", dynamic=dict(update_every=2, score_window=1, drop_policy="merge"), **kw)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# -- delegation ----------------------------------------------------------------------
def test_harmless_attributes_are_read_from_the_base_model():
    model = trained(build_gpt2)
    base = model.get_base_model()
    assert base is model.model and type(base).__name__ == "GPT2LMHeadModel"
    assert model.config is base.config and model.device == base.device and model.dtype == base.dtype
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 5)


@pytest.mark.parametrize("name", ["enable_adapters", "disable_adapters", "add_adapter", "active_adapters",
                                  "get_adapter_state_dict", "_upload_modified_files"])
def test_saving_uploading_and_adapter_calls_never_reach_the_base_model(name):
    model = trained()
    assert hasattr(model.model, name)  # the base model has it: SparseModel refuses to forward it
    with pytest.raises(AttributeError, match="does not forward"):
        getattr(model, name)
    assert not hasattr(model, name)


@pytest.mark.parametrize("name", ["save_pretrained_sharded", "push_to_hub_async", "upload_folder",
                                  "from_pretrained_somehow", "load_adapters"])
def test_calls_named_like_saving_or_adapters_are_refused_too(name):
    model = trained()
    with pytest.raises(AttributeError, match="does not forward"):
        getattr(model, name)


def test_sparseft_defines_its_own_adapter_calls():
    model = trained()
    for name in ("save_pretrained", "push_to_hub", "load_adapter", "set_adapter", "delete_adapter",
                 "add_weighted_adapter", "disable_adapter", "get_base_model", "get_nb_trainable_parameters"):
        assert getattr(type(model), name) is not None, name
    assert model.active_adapter == "default"


def test_base_model_is_not_offered():
    model = trained()
    with pytest.raises(AttributeError, match="get_base_model"):
        model.base_model  # noqa: B018
    assert not hasattr(model, "base_model")


def test_nb_trainable_parameters_counts_values_and_head():
    model = trained()
    trainable, total = model.get_nb_trainable_parameters()
    head = sum(p.numel() for p in model.model.classifier.parameters())
    assert trainable == model.num_sparse_params() + head
    assert total == sum(p.numel() for p in model.model.parameters())


# -- disable_adapter -------------------------------------------------------------------
@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapter_gives_the_base_outputs_and_restores_exactly(merged):
    batch = make_batch()
    # a dynamic run with drop_policy="merge": some entries are folded into the base weights
    model = sparseft.get_sparse_model(tiny_one_layer_bert(0), sparseft.SparseConfig(**dynamic_config()),
                                      calibration_data=toy_batches(1))
    train(model, toy_batches(4), TrainingArguments(lr=5e-2, max_steps=4, warmup_ratio=0.0, progress=False))
    assert model.num_folded_params() > 0
    batch = {k: v.clamp_max(49) if k == "input_ids" else v for k, v in batch.items()}
    if merged:
        model.merge()
    before = logits(model, batch)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    fresh = tiny_one_layer_bert(0).eval()
    fresh.classifier.load_state_dict(model.model.classifier.state_dict())  # heads are trained in place
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), logits(fresh, batch))
    assert torch.equal(logits(model, batch), before)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    assert all(layer.merged == merged for layer in model.sparse_layers().values())


# -- from_pretrained ---------------------------------------------------------------------
def test_from_pretrained_is_frozen_and_in_eval_mode_by_default(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    base = build_bert().train()
    loaded = SparseModel.from_pretrained(base, tmp_path)
    assert not loaded.training and not loaded.model.training
    assert loaded.get_nb_trainable_parameters()[0] == 0
    trainable = SparseModel.from_pretrained(build_bert(), tmp_path, is_trainable=True)
    assert all(p.requires_grad for p in trainable.sparse_parameters())
    assert all(p.requires_grad for p in trainable.model.classifier.parameters())
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


def test_a_loaded_dynamic_adapter_keeps_moving_its_entries(tmp_path):
    model = sparseft.get_sparse_model(tiny_one_layer_bert(0), sparseft.SparseConfig(**dynamic_config()),
                                      calibration_data=toy_batches(1))
    args = TrainingArguments(lr=5e-2, max_steps=4, warmup_ratio=0.0, progress=False)
    train(model, toy_batches(4), args)
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / CONFIG_NAME).read_text())["method"]
    assert record == {"name": "dynamic", "state": {"updates": 2, "history": model.method.history}}

    loaded = SparseModel.from_pretrained(tiny_one_layer_bert(0), tmp_path, is_trainable=True)
    assert type(loaded.method).__name__ == "DynamicMask" and loaded.method.updates == 2
    before = {n: l.indices.clone() for n, l in loaded.sparse_layers().items()}
    train(loaded, toy_batches(4, seed=1), args)
    assert loaded.method.updates == 4
    assert any(not torch.equal(before[n], l.indices) for n, l in loaded.sparse_layers().items())


def strip_method_record(folder, legacy_names=False):
    meta = json.loads((folder / CONFIG_NAME).read_text())
    del meta["method"]
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    if legacy_names:
        (folder / WEIGHTS_NAME).rename(folder / LEGACY_WEIGHTS_NAME)
        (folder / CONFIG_NAME).rename(folder / LEGACY_CONFIG_NAME)


@pytest.mark.parametrize("legacy_names", [False, True])
def test_an_old_dynamic_adapter_is_refused_for_training_but_loads_for_inference(tmp_path, legacy_names):
    model = sparseft.get_sparse_model(tiny_one_layer_bert(0), sparseft.SparseConfig(**dynamic_config()),
                                      calibration_data=toy_batches(1))
    train(model, toy_batches(2), TrainingArguments(lr=5e-2, max_steps=2, warmup_ratio=0.0, progress=False))
    model.save_pretrained(tmp_path)
    strip_method_record(tmp_path, legacy_names)
    with pytest.raises(AdapterError, match="saved without its state"):
        SparseModel.from_pretrained(tiny_one_layer_bert(0), tmp_path, is_trainable=True)
    loaded = SparseModel.from_pretrained(tiny_one_layer_bert(0), tmp_path)
    batch = toy_batches(1)[0]
    model.eval()
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_old_file_names_are_still_read(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    strip_method_record(tmp_path, legacy_names=True)
    meta = json.loads((tmp_path / LEGACY_CONFIG_NAME).read_text())
    assert meta["weights_sha256"] == file_sha256(tmp_path / LEGACY_WEIGHTS_NAME)
    loaded = SparseModel.from_pretrained(build_bert(), tmp_path, is_trainable=True)  # static: trainable is fine
    assert torch.equal(logits(loaded, make_batch()), logits(model, make_batch()))


def test_a_loaded_id3_adapter_is_not_continued_on_another_schedule(tmp_path):
    model = sparseft.get_sparse_model(tiny_one_layer_bert(0), sparseft.SparseConfig(method="id3", density=0.05))
    train(model, toy_batches(4), TrainingArguments(lr=5e-2, max_steps=4, warmup_ratio=0.0, progress=False))
    model.save_pretrained(tmp_path)
    loaded = SparseModel.from_pretrained(tiny_one_layer_bert(0), tmp_path, is_trainable=True)
    assert loaded.method.counts == model.method.counts and loaded.method.budget == model.method.budget
    with pytest.raises(ValueError, match="already unmasked"):
        train(loaded, toy_batches(6), TrainingArguments(lr=5e-2, max_steps=6, warmup_ratio=0.0, progress=False))


def test_a_compacted_dst_adapter_is_not_continued_as_dst(tmp_path):
    model = sparseft.get_sparse_model(tiny_one_layer_bert(0), sparseft.SparseConfig(method="dst", density=0.05))
    train(model, toy_batches(2), TrainingArguments(lr=5e-2, max_steps=2, warmup_ratio=0.0, progress=False))
    model.save_pretrained(tmp_path)
    loaded = SparseModel.from_pretrained(tiny_one_layer_bert(0), tmp_path, is_trainable=True)
    with pytest.raises(ValueError, match="compacted"):
        train(loaded, toy_batches(2), TrainingArguments(lr=5e-2, max_steps=2, warmup_ratio=0.0, progress=False))


# -- not mistaken for a transformers model or a PEFT adapter ------------------------------
def test_the_adapter_folder_has_sparseft_names_only(tmp_path):
    trained().save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sparseft_config.json", "sparseft_delta.safetensors"]


def test_transformers_refuses_an_adapter_folder_with_its_no_config_message(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    trained().save_pretrained(tmp_path)
    for load in (AutoConfig.from_pretrained, AutoModelForSequenceClassification.from_pretrained):
        with pytest.raises((OSError, ValueError)) as err:
            load(str(tmp_path))
        assert not isinstance(err.value, KeyError)
        assert "config.json" in str(err.value)


def test_peft_refuses_an_adapter_folder_with_its_no_adapter_config_message(tmp_path):
    from peft import PeftModel

    trained().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(build_bert(), str(tmp_path))


# -- push_to_hub ---------------------------------------------------------------------------
class FakeHfApi:
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        FakeHfApi.calls.append(("create_repo", repo_id, private, exist_ok))
        return repo_id

    def upload_folder(self, repo_id, folder_path, **kwargs):
        from pathlib import Path

        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*"))
        sizes = {f: (Path(folder_path) / f).stat().st_size for f in files}
        FakeHfApi.calls.append(("upload_folder", repo_id, files, sizes, kwargs))
        return "commit-url"


def test_push_to_hub_uploads_only_the_adapter(monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    model = trained()
    monkeypatch.setattr(type(model.model), "save_pretrained", lambda *a, **k: pytest.fail("base model saved"))
    monkeypatch.setattr(type(model.model), "push_to_hub", lambda *a, **k: pytest.fail("base model pushed"))
    assert model.push_to_hub("me/my-adapter", private=True, token="t") == "commit-url"
    (create, repo, private, exist_ok), upload = FakeHfApi.calls
    assert (create, repo, private, exist_ok) == ("create_repo", "me/my-adapter", True, True)
    assert upload[0:3] == ("upload_folder", "me/my-adapter", ["sparseft_config.json", "sparseft_delta.safetensors"])
    dense = sum(p.numel() * p.element_size() for p in model.model.parameters())
    assert sum(upload[3].values()) < dense / 5


def test_load_state_dict_takes_index_sets_of_another_size():
    model = sparseft.get_sparse_model(tiny_one_layer_bert(0), sparseft.SparseConfig(method="id3", density=0.05))
    train(model, toy_batches(3), TrainingArguments(lr=5e-2, max_steps=3, warmup_ratio=0.0, progress=False))
    fresh = sparseft.get_sparse_model(tiny_one_layer_bert(0), sparseft.SparseConfig(method="id3", density=0.05))
    assert fresh.num_sparse_params() == 0 < model.num_sparse_params()
    fresh.load_state_dict(model.state_dict())
    for (n, a), b in zip(model.sparse_layers().items(), fresh.sparse_layers().values()):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values), n
    batch = toy_batches(1, seed=4)[0]
    model.eval(), fresh.eval()
    assert torch.equal(logits(model, batch), logits(fresh, batch))
