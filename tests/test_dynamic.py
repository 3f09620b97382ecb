"""Dynamic masks: kept entries keep values and moments, dropped ones leave no trace in the
optimizer, outputs are continuous across a merge-policy update, and the adapter of a
dynamic run (with folded entries) reloads to identical logits."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import sparseft
from sparseft import SparseConfig, SparseModel, get_sparse_model
from sparseft.config import DynamicOptions
from sparseft.delta import SparseDeltaLayer
from sparseft.methods import DynamicMask
from sparseft.callback import SparseCallback
from sparseft.train import TrainingArguments, create_optimizer, train
from conftest import NO_DROPOUT, tiny_bert_classifier
from test_train import toy_batches


def dynamic_model(seed=0, drop_policy="merge", **kw):
    cfg = SparseConfig(method="gradient", density=0.05, schedule="dynamic", seed=seed,
                       dynamic=DynamicOptions(update_every=3, score_window=2, drop_policy=drop_policy))
    return get_sparse_model(tiny_bert_classifier(seed, **NO_DROPOUT), dataclasses.replace(cfg, **kw),
                            calibration_data=toy_batches(2, 8, seed=99))


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


class Recorder:
    """Wraps set_index_sets to see each layer's entries, values and moments around an update."""

    def __init__(self, model, optimizer):
        self.events = []
        original = model.set_index_sets

        def recording(index_sets, opt=None, drop_policy="zero"):
            before = self.snapshot(model, optimizer)
            out = original(index_sets, opt, drop_policy=drop_policy)
            self.events.append((before, self.snapshot(model, optimizer)))
            return out

        model.set_index_sets = recording

    @staticmethod
    def snapshot(model, optimizer):
        snap = {}
        for name, layer in model.sparse_layers().items():
            state = optimizer.state.get(layer.values, {})
            snap[name] = {"idx": layer.indices.clone(), "val": layer.values.detach().clone(),
                          **{k: v.expand(layer.values.shape).clone() for k, v in state.items()}}  # a 0-dim step too
        return snap


def test_update_keeps_values_and_moments_and_new_entries_start_fresh():
    model = dynamic_model()
    opt = create_optimizer(model, lr=1e-2)
    rec = Recorder(model, opt)
    budget = model.num_sparse_params()
    train(model, toy_batches(7, 8), TrainingArguments(lr=1e-2, max_steps=7, progress=False, warmup_ratio=0.0), optimizer=opt)
    assert model.method.updates == 2 and len(rec.events) == 2  # steps 3 and 6
    assert sum(h["moved"] for h in model.method.history) > 0, "the test needs an update that moves entries"
    for before, after in rec.events:
        for name in before:
            b, a = before[name], after[name]
            kept = torch.isin(a["idx"], b["idx"])
            old_pos = torch.searchsorted(b["idx"], a["idx"][kept])
            for key in ("val", "exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(a[key][kept], b[key][old_pos]), (name, key)
                assert a[key].shape == a["idx"].shape  # no trace of dropped entries
                assert bool((a[key][~kept] == 0).all()), (name, key)
    assert model.num_sparse_params() == budget
    assert all(layer.grad_observer is None for layer in model.sparse_layers().values())


@pytest.mark.parametrize("policy", ["merge", "zero"])
def test_output_is_continuous_across_an_update_with_merge(policy):
    model = dynamic_model(drop_policy=policy)
    batch = toy_batches(1, 8, seed=5)[0]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.values.copy_(torch.randn(layer.num_entries, generator=gen) * 0.2)
    method = model.method
    for step in (1, 2, 3):  # step 1 is outside the window; steps 2 and 3 feed the rescoring
        method.on_step_begin(step, model)
        model(**toy_batches(1, 8, seed=step)[0]).loss.backward()
        model.zero_grad(set_to_none=True)
    before = logits(model, batch)
    base_before = {n: l.weight.clone() for n, l in model.sparse_layers().items()}
    method.on_step(3, model)
    moved = method.history[-1]["moved"]
    assert moved > 0
    after = logits(model, batch)
    if policy == "merge":
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
        assert model.num_folded_params() == moved
    else:
        assert not torch.allclose(after, before, atol=1e-4)
        assert model.num_folded_params() == 0
        assert all(torch.equal(l.weight, base_before[n]) for n, l in model.sparse_layers().items())


def trained_dynamic(policy="merge", steps=7):
    model = dynamic_model(drop_policy=policy)
    train(model, toy_batches(steps, 8), TrainingArguments(lr=5e-2, max_steps=steps, progress=False, warmup_ratio=0.0))
    return model


def test_dynamic_adapter_reloads_to_identical_logits_and_merges(tmp_path):
    model = trained_dynamic()
    assert model.num_folded_params() > 0
    batch = toy_batches(1, 8, seed=7)[0]
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "a")
    loaded = SparseModel.from_pretrained(tiny_bert_classifier(0, **NO_DROPOUT), tmp_path / "a")
    assert loaded.num_folded_params() == model.num_folded_params()
    assert torch.equal(logits(loaded, batch), expected)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(logits(merged, batch), expected, rtol=1e-5, atol=1e-6)


def test_unload_restores_the_pristine_base_after_folds():
    pristine = tiny_bert_classifier(0, **NO_DROPOUT)
    model = trained_dynamic()
    assert model.num_folded_params() > 0
    base = model.unload()
    for (n, p), (_, q) in zip(base.named_parameters(), pristine.named_parameters()):
        if "classifier" not in n:
            assert torch.equal(p, q), n


def test_fold_twice_at_one_position_replays_bit_exactly():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    w0 = lin.weight.detach().clone()
    layer = SparseDeltaLayer(copy.deepcopy(lin))
    layer.fold_into_base(torch.tensor([1, 7, 20]), torch.tensor([0.1, -0.3, 1e-3]))
    layer.fold_into_base(torch.tensor([7, 9]), torch.tensor([0.7, 0.05]))
    assert layer.folded_indices.tolist() == [1, 7, 9, 20]
    replay = SparseDeltaLayer(copy.deepcopy(lin))
    replay.set_folded(layer.folded_indices, layer.folded_values)
    assert torch.equal(replay.weight, layer.weight)
    layer.restore_base()
    assert torch.equal(layer.weight, w0) and layer.num_folded == 0


def test_adapter_with_broken_fold_record_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = trained_dynamic()
    model.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "sparseft_delta.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith(".folded_values"))
    del tensors[key]
    save_file(tensors, str(path), metadata={"format": "pt"})
    import json

    from sparseft.model import CONFIG_NAME, file_sha256

    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    meta["weights_sha256"] = file_sha256(path)  # consistent files: the structural check must catch it
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(sparseft.AdapterError, match="folded"):
        SparseModel.from_pretrained(tiny_bert_classifier(0, **NO_DROPOUT), tmp_path / "a")


@pytest.mark.parametrize("method", ["random", "synflow"])
def test_data_free_scorers_rescore_without_a_window(method):
    config = SparseConfig(method=method, density=0.05, schedule="dynamic",
                          dynamic=DynamicOptions(update_every=2, score_window=1))
    model = get_sparse_model(tiny_bert_classifier(0, **NO_DROPOUT), config)
    train(model, toy_batches(4, 8), TrainingArguments(lr=1e-2, max_steps=4, progress=False))
    assert model.method.updates == 2
    assert model.num_sparse_params() == round(0.05 * model.num_targeted_weights())


def test_dynamic_under_the_transformers_trainer(tmp_path):
    from transformers import Trainer
    from transformers import TrainingArguments as HFArgs

    rows = [{k: v[i] for k, v in b.items()} for b in toy_batches(6, 8) for i in range(8)]
    model = dynamic_model()
    opt = create_optimizer(model, lr=1e-2)
    hf_args = HFArgs(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=6, report_to=[],
                     save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=hf_args, train_dataset=rows, optimizers=(opt, None),
                      callbacks=[SparseCallback(model)])
    trainer.train()
    assert isinstance(model.method, DynamicMask) and model.method.updates == 2
    assert sum(h["moved"] for h in model.method.history) > 0
    assert all(layer.grad_observer is None for layer in model.sparse_layers().values())


def test_dynamic_with_a_plain_torch_optimizer_is_a_clear_error():
    model = dynamic_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(RuntimeError, match="SparseAdamW"):
        train(model, toy_batches(3, 8), TrainingArguments(lr=1e-2, max_steps=3, progress=False), optimizer=opt)


def test_cli_options_reach_the_config(capsys, tmp_path):
    from sparseft.app.cli import build_parser, main

    ns = build_parser().parse_args(["train", "--out", str(tmp_path), "--method", "snip", "--selection", "per-layer",
                                    "--schedule", "dynamic", "--update-every", "64", "--score-window", "4",
                                    "--drop-policy", "zero", "--calib-examples", "256", "--d3-exponent", "0.5"])
    assert (ns.method, ns.selection, ns.schedule, ns.update_every, ns.score_window, ns.drop_policy, ns.calib_examples,
            ns.d3_exponent) == ("snip", "per-layer", "dynamic", 64, 4, "zero", 256, 0.5)
    assert main(["train", "--out", str(tmp_path), "--method", "fisher", "--schedule", "dynamic"]) == 2
    assert "dynamic" in capsys.readouterr().err
