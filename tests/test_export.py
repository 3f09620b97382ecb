"""Exports: a merged plain transformers folder that AutoModel loads, and a peft
Super-Tuning folder that stock peft.PeftModel loads, both giving the SparseModel's logits."""
import pytest
import torch

import sparseft
from conftest import build_bert, build_gpt2, make_batch, tiny_one_layer_bert, toy_batches
from sparseft.export import ExportError, peft_export_problems, peft_padding, save_merged, save_peft
from sparseft.train import TrainingArguments, train


def with_values(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.values.copy_(torch.randn(layer.values.shape, generator=gen) * 0.1)
        for p in model.dense_trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def bert_model():
    return with_values(sparseft.get_sparse_model(build_bert(), sparseft.SparseConfig(method="magnitude", density=0.05)))


def folded_model():
    """A dynamic run with drop_policy="merge": some entries live in the base weights."""
    model = sparseft.get_sparse_model(tiny_one_layer_bert(0), sparseft.SparseConfig(
        method="gradient", density=0.05, schedule="dynamic",
        dynamic=sparseft.DynamicOptions(update_every=2, score_window=1, drop_policy="merge")),
        calibration_data=toy_batches(1))
    train(model, toy_batches(4), TrainingArguments(lr=5e-2, max_steps=4, warmup_ratio=0.0, progress=False))
    assert model.num_folded_params() > 0
    return model.eval()


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def small_batch():
    batch = make_batch()
    return {**batch, "input_ids": batch["input_ids"] % 50}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("make", [bert_model, folded_model])
def test_merged_export_loads_with_automodel_and_gives_the_merged_logits(tmp_path, make):
    from transformers import AutoModelForSequenceClassification

    model = make()
    batch = small_batch()
    before = snapshot(model)
    save_merged(model, tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # left unchanged
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not any("values" in n or "base_layer" in n for n, _ in plain.named_parameters())
    expected = logits(model, batch)
    model.merge()
    assert torch.equal(logits(plain, batch), logits(model, batch))
    torch.testing.assert_close(logits(plain, batch), expected, rtol=1e-5, atol=1e-6)


def test_merged_export_of_a_causal_lm(tmp_path):
    from transformers import AutoModelForCausalLM

    model = with_values(sparseft.get_sparse_model(build_gpt2(), sparseft.SparseConfig(density=0.05)))
    save_merged(model, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    batch = make_batch()
    torch.testing.assert_close(logits(plain, batch), logits(model, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [bert_model, folded_model])
def test_peft_export_loads_with_stock_peft_and_gives_the_same_logits(tmp_path, make):
    from peft import PeftModel

    model = make()
    padding = peft_padding(model)
    assert len(set(padding.values())) > 1  # index sets of different sizes: padded
    save_peft(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = build_bert() if make is bert_model else tiny_one_layer_bert(0)
    loaded = PeftModel.from_pretrained(fresh.eval(), str(tmp_path))
    batch = small_batch()
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=1e-5, atol=1e-6)
    # dense reference: peft's delta of each layer is the SparseModel's W + S - W0
    pristine = build_bert() if make is bert_model else tiny_one_layer_bert(0)
    for name, layer in model.sparse_layers().items():
        peft_layer = loaded.get_base_model().get_submodule(name)
        w0 = pristine.get_submodule(name).weight
        assert torch.equal(peft_layer.get_base_layer().weight, w0)
        ours = (layer.weight + layer.delta_weight()) - w0
        torch.testing.assert_close(peft_layer.get_delta_weight("default"), ours, rtol=0, atol=1e-7)


def test_peft_export_is_refused_for_conv1d_layers(tmp_path):
    model = with_values(sparseft.get_sparse_model(build_gpt2(), sparseft.SparseConfig(density=0.05)))
    assert any("Conv1D" in p for p in peft_export_problems(model))
    with pytest.raises(ExportError, match="nn.Linear only"):
        save_peft(model, tmp_path)


def test_peft_export_of_a_llama(tmp_path):
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()

    model = with_values(sparseft.get_sparse_model(llama(), sparseft.SparseConfig(method="magnitude", density=0.02)))
    assert not peft_export_problems(model)
    save_peft(model, tmp_path)
    loaded = PeftModel.from_pretrained(llama(), str(tmp_path))
    batch = make_batch()
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_cli_export_writes_folders_that_automodel_and_peft_load(tmp_path, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from _tiny import sentiment_rows, tiny_bert_dir, tiny_llama_dir, write_rows
    from sparseft.app.cli import main
    from sparseft.app.pretrained import load_causal_lm, load_classifier
    from sparseft.model import SparseModel

    base_dir = (tiny_bert_dir if kind == "bert" else tiny_llama_dir)(tmp_path / kind)
    write_rows(tmp_path / "train.jsonl", sentiment_rows(24))
    write_rows(tmp_path / "eval.jsonl", sentiment_rows(8, seed=1))
    data = ["--train-file", str(tmp_path / "train.jsonl"), "--eval-file", str(tmp_path / "eval.jsonl")]
    if kind == "llama":
        data += ["--prompt-column", "prompt", "--target-column", "target"]
    assert main(["train", "--model", str(base_dir), *data, "--max-steps", "2", "--batch-size", "8",
                 "--density", "0.05", "--lr", "0.05", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert main(["export", "--adapter", str(adapter), "--merged", str(tmp_path / "merged"),
                 "--peft", str(tmp_path / "peft")]) == 0
    if kind == "bert":
        base = load_classifier(str(base_dir), 2)[0]
        plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
        peft_base = load_classifier(str(base_dir), 2)[0]
    else:
        base = load_causal_lm(str(base_dir))[0]
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        peft_base = load_causal_lm(str(base_dir))[0]
    sparse = SparseModel.from_pretrained(base, adapter)
    assert sparse.num_sparse_params() > 0 and any(l.values.abs().sum() > 0 for l in sparse.sparse_layers().values())
    batch = {"input_ids": torch.tensor([[2, 5, 6, 7, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    expected = logits(sparse, batch)
    torch.testing.assert_close(logits(plain.eval(), batch), expected, rtol=1e-5, atol=1e-5)
    loaded = PeftModel.from_pretrained(peft_base.eval(), str(tmp_path / "peft"))
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=1e-5, atol=1e-5)
