"""Checkpoints: a run killed at step k and resumed ends bit-identical to an uninterrupted
run; a crash mid-save leaves the previous checkpoint loadable; non-finite steps stop the
run or are skipped and counted."""
import os

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import sparseft
from sparseft import checkpoint as ckpt
from sparseft.train import NonFiniteError, TrainingArguments, train


class Killed(Exception):
    pass


CONFIGS = {
    "random-static": dict(method="random"),
    # windows are steps 2-4, 6-8, 10-12: the step-6 checkpoint holds a partial gradient sum
    "gradient-dynamic": dict(method="gradient", schedule="dynamic",
                             dynamic=dict(update_every=4, score_window=3, drop_policy="merge")),
    "id3": dict(method="id3"),
    "grow-drop": dict(method="grow-drop", grow_drop=dict(every=4)),
    # windows are steps 2-4 and 6-8 (no swap at the last step, 12): step 6 holds a partial sum
    "grow-drop-window": dict(method="grow-drop", grow_drop=dict(every=4, score_window=3)),
    "dst": dict(method="dst"),
}


def model_with_dropout(kind="random-static"):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=2, hidden_dropout_prob=0.1)
    calibration = list(shuffled_loader(seed=5))[:2]
    return sparseft.get_sparse_model(BertForSequenceClassification(cfg),
                                     sparseft.SparseConfig(density=0.1, **CONFIGS[kind]), calibration_data=calibration)


def shuffled_loader(seed=0):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(8, 50, (40, 10), generator=gen)
    labels = (ids[:, 0] > 30).long()
    rows = [{"input_ids": ids[i], "labels": labels[i]} for i in range(40)]
    return torch.utils.data.DataLoader(rows, batch_size=8, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def args(**kw):
    base = dict(lr=1e-2, max_steps=12, grad_accum=1, warmup_ratio=0.2, save_every=3, progress=False, seed=0)
    return TrainingArguments(**{**base, **kw})


def values_of(model):
    return {n: l.values.detach().clone() for n, l in model.sparse_layers().items()}


def kill_at_forward(model, n):
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1
        if calls["n"] == n:
            raise Killed()
    return model.register_forward_pre_hook(hook)


@pytest.mark.parametrize("kind, grad_accum", [("random-static", 1), ("random-static", 2), ("gradient-dynamic", 1),
                                              ("gradient-dynamic", 2), ("id3", 1), ("grow-drop", 1), ("grow-drop-window", 1),
                                              ("dst", 1)])
def test_killed_and_resumed_run_is_bit_identical(tmp_path, kind, grad_accum):
    # 12 steps over 5 batches per epoch: the kill and the resume cross epoch boundaries.
    reference = model_with_dropout(kind)
    train(reference, shuffled_loader(), args(grad_accum=grad_accum))

    killed = model_with_dropout(kind)
    kill_at_forward(killed, 7 * grad_accum + 1)  # dies during step 8, after the checkpoint of step 6
    with pytest.raises(Killed):
        train(killed, shuffled_loader(), args(grad_accum=grad_accum), checkpoint_dir=str(tmp_path))
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-6"

    resumed = model_with_dropout(kind)
    result = train(resumed, shuffled_loader(), args(grad_accum=grad_accum), checkpoint_dir=str(tmp_path),
                   resume_from=str(ckpt.latest_checkpoint(tmp_path)))
    assert result.steps == 12 and len(result.losses) == 12
    for name, ref in values_of(reference).items():
        assert torch.equal(values_of(resumed)[name], ref), name
    for (name, a), b in zip(reference.sparse_layers().items(), resumed.sparse_layers().values()):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.weight, b.weight), name  # folds replayed too
    if kind == "gradient-dynamic":
        assert resumed.method.updates == reference.method.updates == 3
        assert reference.num_folded_params() > 0
    head_ref = reference.model.classifier.weight
    assert torch.equal(resumed.model.classifier.weight, head_ref)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    train(model_with_dropout(), shuffled_loader(), args(keep_checkpoints=2), checkpoint_dir=str(tmp_path))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-12"]


def test_crash_between_write_and_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = model_with_dropout()
    train(model, shuffled_loader(), args(max_steps=3), checkpoint_dir=str(tmp_path))
    good = ckpt.latest_checkpoint(tmp_path)

    def crash(*_):
        raise OSError("power cut")
    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        train(model_with_dropout(), shuffled_loader(), args(max_steps=6, save_every=6), checkpoint_dir=str(tmp_path))
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    fresh = model_with_dropout()
    opt = sparseft.create_optimizer(fresh, 1e-2)
    loop = ckpt.load_checkpoint(good, fresh, opt, None)
    assert loop["steps"] == 3
    for name, v in values_of(model).items():
        assert torch.equal(values_of(fresh)[name], v)


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    train(model_with_dropout(), shuffled_loader(), args(max_steps=3), checkpoint_dir=str(tmp_path))
    folder = ckpt.latest_checkpoint(tmp_path)
    data = (folder / ckpt.OPTIMIZER_NAME).read_bytes()
    (folder / ckpt.OPTIMIZER_NAME).write_bytes(data[: len(data) // 2])
    fresh = model_with_dropout()
    with pytest.raises(ckpt.CheckpointError, match="cannot be read"):
        ckpt.load_checkpoint(folder, fresh, sparseft.create_optimizer(fresh, 1e-2), None)


def poison_after(model, n):
    calls = {"n": 0}

    def hook(_module, _inputs, output):
        calls["n"] += 1
        if calls["n"] == n:
            output.loss = output.loss * float("nan")
        return output
    model.model.register_forward_hook(hook)


def test_nonfinite_loss_stops_with_the_last_good_checkpoint(tmp_path):
    model = model_with_dropout()
    poison_after(model, 5)
    with pytest.raises(NonFiniteError, match="step 5; the last good checkpoint is .*checkpoint-3"):
        train(model, shuffled_loader(), args(), checkpoint_dir=str(tmp_path))


def test_skip_nonfinite_skips_and_counts(tmp_path):
    model = model_with_dropout()
    poison_after(model, 5)
    result = train(model, shuffled_loader(), args(skip_nonfinite=True, save_every=0))
    assert result.skipped_steps == 1 and result.steps == 12
    for layer in model.sparse_layers().values():
        assert bool(torch.isfinite(layer.values).all())
