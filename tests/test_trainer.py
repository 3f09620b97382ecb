"""SparseTrainer: transformers.Trainer with sparseft's optimizer and callback set by itself,
adapter-only checkpoints, save_model() writing the adapter, and a killed run resumed
bit-identically for every method."""
import os

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification
from transformers import TrainingArguments as HFArgs
from transformers import TrainerCallback

import sparseft
from sparseft.model import CONFIG_NAME, WEIGHTS_NAME, SparseModel
from sparseft.optim import SparseAdamW
from sparseft.trainer import METHOD_STATE_JSON, SparseTrainer
from sparseft.callback import SparseCallback

CONFIGS = {
    "random-static": dict(method="random"),
    # windows are steps 2-4, 6-8, 10-12: the step-6 checkpoint holds a partial gradient sum
    "gradient-dynamic": dict(method="gradient", schedule="dynamic", dynamic=dict(update_every=4, score_window=3, drop_policy="merge")),
    "id3": dict(method="id3"),
    "grow-drop": dict(method="grow-drop", grow_drop=dict(every=4, score_window=3)),
    "dst": dict(method="dst"),
}


class Killed(Exception):
    pass


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(8, 50, (40, 10), generator=gen)
        self.labels = (self.ids[:, 0] > 30).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def sparse_model(kind):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=2, hidden_dropout_prob=0.1)
    calibration = [{"input_ids": Rows().ids[:8], "labels": Rows().labels[:8]}]
    return sparseft.get_sparse_model(BertForSequenceClassification(cfg),
                                     sparseft.SparseConfig(density=0.1, **CONFIGS[kind]), calibration_data=calibration)


def hf_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=12, learning_rate=1e-2,
                warmup_steps=2, save_strategy="steps", save_steps=3, logging_steps=1, report_to=[], seed=0,
                use_cpu=True, disable_tqdm=True, save_total_limit=None)
    return HFArgs(**{**base, **kw})


class KillAtStep(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise Killed()


def state_of(model):
    out = {f"{n}.indices": l.indices.clone() for n, l in model.sparse_layers().items()}
    out.update({f"{n}.values": l.values.detach().clone() for n, l in model.sparse_layers().items()})
    out.update({f"{n}.weight": l.weight.detach().clone() for n, l in model.sparse_layers().items()})
    out.update({f"head.{n}": p.detach().clone() for n, p in model.model.classifier.named_parameters()})
    return out


def losses(trainer):
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_killed_and_resumed_trainer_run_is_bit_identical(tmp_path, kind):
    reference = sparse_model(kind)
    ref_trainer = SparseTrainer(reference, hf_args(tmp_path / "ref"), train_dataset=Rows())
    ref_trainer.train()

    killed = sparse_model(kind)
    with pytest.raises(Killed):
        SparseTrainer(killed, hf_args(tmp_path / "run"), train_dataset=Rows(), callbacks=[KillAtStep(8)]).train()
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-3", "checkpoint-6"]

    resumed = sparse_model(kind)
    trainer = SparseTrainer(resumed, hf_args(tmp_path / "run"), train_dataset=Rows())
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert trainer.state.global_step == 12
    expected, found = state_of(reference), state_of(resumed)
    for key, value in expected.items():
        assert torch.equal(found[key], value), key
    assert losses(trainer)[-6:] == losses(ref_trainer)[-6:]
    if kind == "gradient-dynamic":
        assert resumed.method.updates == reference.method.updates == 3 and reference.num_folded_params() > 0
    if kind == "id3":
        assert reference.num_sparse_params() > 0


def test_the_trainer_sets_optimizer_and_callback_itself(tmp_path):
    model = sparse_model("id3")
    trainer = SparseTrainer(model, hf_args(tmp_path, max_steps=3, save_strategy="no"), train_dataset=Rows())
    assert sum(isinstance(c, SparseCallback) for c in trainer.callback_handler.callbacks) == 1
    assert trainer.label_names == ["labels"]
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      SparseAdamW)
    assert model.num_sparse_params() == model.method.budget  # every ID3 event ran


def test_checkpoints_hold_the_adapter_not_the_dense_model(tmp_path):
    model = sparse_model("gradient-dynamic")
    SparseTrainer(model, hf_args(tmp_path, max_steps=3), train_dataset=Rows()).train()
    files = set(os.listdir(tmp_path / "checkpoint-3"))
    assert {CONFIG_NAME, WEIGHTS_NAME, METHOD_STATE_JSON, "optimizer.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "config.json"}
    dense_bytes = sum(p.numel() * p.element_size() for p in model.model.parameters())
    assert os.path.getsize(tmp_path / "checkpoint-3" / WEIGHTS_NAME) < dense_bytes / 4


def test_save_model_writes_a_loadable_adapter(tmp_path):
    model = sparse_model("random-static")
    trainer = SparseTrainer(model, hf_args(tmp_path / "run", max_steps=3, save_strategy="no"), train_dataset=Rows())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert {CONFIG_NAME, WEIGHTS_NAME} <= set(os.listdir(tmp_path / "final"))
    assert METHOD_STATE_JSON not in os.listdir(tmp_path / "final")
    torch.manual_seed(0)
    fresh = sparse_model("random-static").unload()
    loaded = SparseModel.from_pretrained(fresh, tmp_path / "final")
    batch = {"input_ids": Rows().ids[:4]}
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_a_plain_optimizer_is_refused_for_methods_that_move_entries(tmp_path):
    model = sparse_model("id3")
    opt = torch.optim.AdamW(model.sparse_parameters(), lr=1e-2)
    trainer = SparseTrainer(model, hf_args(tmp_path, max_steps=2, save_strategy="no"), train_dataset=Rows(),
                            optimizers=(opt, None))
    with pytest.raises(ValueError, match="SparseAdamW"):
        trainer.train()
