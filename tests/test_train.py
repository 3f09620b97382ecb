"""The training loop and the transformers Trainer callback."""
import copy

import pytest
import torch

import sparseft
from conftest import NO_DROPOUT, RowsDataset, rows_of, tiny_bert_classifier
from conftest import toy_batches as shared_toy_batches
from sparseft.callback import SparseCallback
from sparseft.train import TrainingArguments, create_optimizer, linear_schedule, train


def toy_batches(n_batches, batch_size, seed=0):
    return shared_toy_batches(n_batches, batch_size, seed, seq_len=12)


def sparse_model(seed=0, density=0.2):
    return sparseft.get_sparse_model(tiny_bert_classifier(seed, **NO_DROPOUT),
                                     sparseft.SparseConfig(method="random", density=density, seed=seed))


def test_training_lowers_the_loss_and_only_touches_values_and_head():
    model = sparse_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batches = toy_batches(8, 16)
    args = TrainingArguments(lr=1e-2, epochs=6, warmup_ratio=0.0, progress=False)
    result = train(model, batches, args)
    assert result.steps == 48
    assert sum(result.losses[-8:]) / 8 < 0.7 * sum(result.losses[:8]) / 8
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name
    assert any(layer.values.abs().sum() > 0 for layer in model.sparse_layers().values())


def test_gradient_accumulation_matches_a_larger_batch():
    batches = toy_batches(4, 8)
    merged = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(batches[::2], batches[1::2])]
    args_small = TrainingArguments(lr=1e-3, max_steps=2, grad_accum=2, warmup_ratio=0.0, max_grad_norm=None, progress=False)
    args_big = TrainingArguments(lr=1e-3, max_steps=2, grad_accum=1, warmup_ratio=0.0, max_grad_norm=None, progress=False)
    a, b = sparse_model(), sparse_model()
    train(a, batches, args_small)
    train(b, merged, args_big)
    for la, lb in zip(a.sparse_layers().values(), b.sparse_layers().values()):
        torch.testing.assert_close(la.values, lb.values, rtol=1e-4, atol=1e-6)


def test_linear_schedule_warms_up_then_decays_to_zero():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = linear_schedule(opt, warmup_steps=4, total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[:5] == sorted(rates[:5]) and rates[4] == pytest.approx(1.0)
    assert rates[5:] == sorted(rates[5:], reverse=True)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_bad_training_arguments_are_refused():
    for kwargs in ({"lr": 0}, {"grad_accum": 0}, {"max_steps": 0}, {"warmup_ratio": 1.0}):
        with pytest.raises(ValueError):
            TrainingArguments(**kwargs)


def test_transformers_trainer_with_the_callback(tmp_path):
    from transformers import Trainer
    from transformers import TrainingArguments as HFArgs

    rows = rows_of(toy_batches(4, 8))
    model = sparse_model()
    base_before = copy.deepcopy({n: p.detach() for n, p in model.named_parameters() if not p.requires_grad})
    calls = []
    callback = SparseCallback(model)
    begins = []
    callback.controller.after_optimizer_step = lambda step, batch=None, optimizer=None: calls.append((step, optimizer))
    callback.controller.before_optimizer_step = begins.append
    opt = create_optimizer(model, lr=1e-2)
    hf_args = HFArgs(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, report_to=[],
                     save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=hf_args, train_dataset=RowsDataset(rows), optimizers=(opt, None), callbacks=[callback])
    trainer.train()
    assert [c[0] for c in calls] == [1, 2, 3] and begins == [1, 2, 3]
    assert calls[0][1] is not None
    assert any(layer.values.abs().sum() > 0 for layer in model.sparse_layers().values())
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


def test_controller_step_is_the_four_calls_in_order():
    from sparseft.train import SparseController

    def run(by_hand):
        model = sparseft.get_sparse_model(tiny_bert_classifier(0, **NO_DROPOUT), sparseft.SparseConfig(
            method="gradient", density=0.1, schedule="dynamic", dynamic=dict(update_every=2, score_window=1)),
            calibration_data=toy_batches(1, 8))
        opt = create_optimizer(model, lr=1e-2)
        ctl = SparseController(model, opt)
        ctl.train_begin(4)
        for step, batch in enumerate(toy_batches(4, 8), start=1):
            if by_hand:
                ctl.before_optimizer_step(step)
                model(**batch).loss.backward()
                ctl.before_update(step)
                opt.step()
                opt.zero_grad(set_to_none=True)
                ctl.after_optimizer_step(step, batch)
            else:
                with ctl.step(batch=batch) as s:
                    assert s.number == step
                    model(**batch).loss.backward()
        ctl.train_end()
        assert model.method.updates == 2
        return {n: (l.indices, l.values.detach()) for n, l in model.sparse_layers().items()}

    a, b = run(True), run(False)
    for n in a:
        assert torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]), n


def test_controller_step_takes_no_step_when_the_block_raises():
    from sparseft.train import SparseController

    model = sparse_model()
    opt = create_optimizer(model, lr=1e-2)
    ctl = SparseController(model, opt)
    before = [p.detach().clone() for p in model.sparse_parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        with ctl.step():
            model(**toy_batches(1, 4)[0]).loss.backward()
            raise RuntimeError("boom")
    assert ctl.steps_done == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.sparse_parameters()))


def test_log_every_prints_a_line_per_n_steps_with_loss_and_time_left(capsys):
    args = TrainingArguments(lr=1e-2, max_steps=6, warmup_ratio=0.0, progress=False, log_every=2)
    result = train(sparse_model(), toy_batches(4, 8), args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 2/6", "step 4/6", "step 6/6"]
    assert f"loss {result.losses[3]:.4f}, " in lines[1] and "s/step, about " in lines[1]
    assert lines[-1].endswith("about 0 min 00 s left")
    with pytest.raises(ValueError, match="log_every"):
        TrainingArguments(log_every=-1)
