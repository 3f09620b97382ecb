"""``TrainingArguments.bf16`` and ``gradient_checkpointing`` in ``sparseft.train``: training
with them lowers the loss; checkpointing leaves the values' gradients as they are (a
dense float reference); bf16 runs the matmuls in bf16 with gradients close to float's;
evaluation inside ``train`` stays float; a model without checkpointing is a clear error."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sparseft
from conftest import tiny_bert_classifier, tiny_llama, toy_batches
from sparseft.train import SparseController, TrainingArguments, enable_gradient_checkpointing, train

VOCAB = 64


def lm_batches(n, batch=4, seq=12, seed=0):
    """A learnable sequence task: each sequence counts up from a random start (mod VOCAB)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = (torch.randint(0, VOCAB, (batch, 1), generator=gen) + torch.arange(seq)) % VOCAB
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def sparse(base, density=0.05, seed=0):
    """A SparseModel whose values are nonzero, so the deltas take part in every gradient."""
    model = sparseft.get_sparse_model(base, sparseft.SparseConfig(method="random", density=density, seed=seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.values.copy_(torch.randn(layer.values.shape, generator=gen) * 0.02)
    return model


def args(**kw):
    defaults = dict(lr=1e-2, warmup_ratio=0.0, progress=False, max_grad_norm=None)
    return TrainingArguments(**{**defaults, **kw})


def first_step_grads(model, batches, training_args, monkeypatch, eval_fn=None):
    """The sparse values' gradients of ``train``'s first optimizer step, as the optimizer gets them."""
    grads = {}
    original = SparseController.before_update

    def capture(self, step, optimizer=None):
        if step == 1:
            grads.update({n: layer.values.grad.detach().clone() for n, layer in model.sparse_layers().items()})
        original(self, step, optimizer)

    with monkeypatch.context() as m:
        m.setattr(SparseController, "before_update", capture)
        train(model, batches, training_args, eval_fn=eval_fn)
    return grads


def dense_reference_grads(model, batch):
    """Gradients of a float dense llama holding each layer's W + S, read at each layer's
    indexed entries."""
    ref = tiny_llama()
    ref.train()
    for p in ref.parameters():
        p.requires_grad_(False)
    layers = model.sparse_layers()
    for name, layer in layers.items():
        weight = ref.get_submodule(name).weight
        weight.data.copy_(layer.weight.detach() + layer.delta_weight().detach())
        weight.requires_grad_(True)
    ref(**batch).loss.backward()
    return {name: ref.get_submodule(name).weight.grad.reshape(-1)[layer.indices.long()] for name, layer in layers.items()}


def checkpointing_on(base) -> bool:
    flag = getattr(type(base), "is_activation_checkpointing", None)  # the newer transformers name
    return base.is_activation_checkpointing if flag is not None else base.is_gradient_checkpointing


def mean(xs):
    return sum(xs) / len(xs)


def _train_setup(kind, flags):
    """(the transformers model, the result of training ``kind`` on it) with both flags set
    to ``flags``."""
    training = dict(epochs=6, bf16=flags, gradient_checkpointing=flags)
    if kind == "sparse-classifier":
        base = tiny_bert_classifier()
        return base, train(sparse(base, density=0.2), toy_batches(6, 16, seq_len=12), args(lr=3e-2, **training))
    base = tiny_llama()
    if kind == "sparse-lm":
        return base, train(sparse(base, density=0.2), lm_batches(6), args(lr=1e-2, **training))
    pytest.importorskip("peft")
    from sparseft.app.baselines import BaselineConfig, get_baseline_model

    model = get_baseline_model(base, BaselineConfig(method="lora", lora_rank=4))
    return base, train(model, lm_batches(6), args(lr=5e-3, **training), optimizer=model.create_optimizer(5e-3))


@pytest.mark.parametrize("kind", ["sparse-lm", "sparse-classifier", "lora-lm"])
def test_training_with_bf16_and_checkpointing_lowers_the_loss_as_in_float(kind):
    _, plain = _train_setup(kind, False)
    base, flagged = _train_setup(kind, True)
    assert checkpointing_on(base)
    assert flagged.steps == 36 and all(map(torch.isfinite, map(torch.tensor, flagged.losses)))
    assert mean(flagged.losses[-6:]) < 0.9 * mean(flagged.losses[:6])
    assert mean(flagged.losses[-6:]) == pytest.approx(mean(plain.losses[-6:]), rel=3e-2, abs=0.01)


def test_gradient_checkpointing_keeps_the_values_gradients(monkeypatch):
    batches = lm_batches(1)
    plain, checkpointed = sparse(tiny_llama()), sparse(tiny_llama())
    expected = dense_reference_grads(plain, batches[0])
    got_plain = first_step_grads(plain, batches, args(max_steps=1), monkeypatch)
    got_checkpointed = first_step_grads(checkpointed, batches, args(max_steps=1, gradient_checkpointing=True),
                                        monkeypatch)
    assert checkpointing_on(checkpointed.get_base_model())
    assert not checkpointing_on(plain.get_base_model())
    assert expected.keys() == got_plain.keys() == got_checkpointed.keys()
    for name in expected:
        torch.testing.assert_close(got_checkpointed[name], got_plain[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(got_checkpointed[name], expected[name], rtol=1e-4, atol=1e-6)


def test_checkpointing_replays_dropout_so_training_matches_a_plain_run():
    batches = toy_batches(3, 8, seq_len=12)
    plain, checkpointed = sparse(tiny_bert_classifier()), sparse(tiny_bert_classifier())
    a = train(plain, batches, args(max_steps=3))
    b = train(checkpointed, batches, args(max_steps=3, gradient_checkpointing=True))
    assert a.losses == pytest.approx(b.losses, rel=1e-5)
    for la, lb in zip(plain.sparse_layers().values(), checkpointed.sparse_layers().values()):
        torch.testing.assert_close(la.values, lb.values, rtol=1e-4, atol=1e-6)


def test_bf16_runs_the_matmuls_in_bf16_with_gradients_close_to_float(monkeypatch):
    batches = lm_batches(2)
    in_float, in_bf16 = sparse(tiny_llama()), sparse(tiny_llama())
    seen = {"train": set(), "eval": set()}
    phase = ["train"]

    def record(module, inputs, output):
        seen[phase[0]].add(output.dtype)

    for layer in in_bf16.sparse_layers().values():
        layer.register_forward_hook(record)
    in_bf16.get_base_model().lm_head.register_forward_hook(record)

    def evaluate():
        phase[0] = "eval"
        with torch.no_grad():
            loss = in_bf16(**batches[0]).loss
        phase[0] = "train"
        return {"loss": float(loss)}

    expected = first_step_grads(in_float, batches, args(max_steps=2), monkeypatch)
    got = first_step_grads(in_bf16, batches, args(max_steps=2, bf16=True, eval_every=1), monkeypatch, evaluate)
    assert seen == {"train": {torch.bfloat16}, "eval": {torch.float32}}
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        assert grad.dtype == torch.float32
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(grad, expected[name], rtol=0.05, atol=0.03 * scale)  # about 1% seen
        cos = torch.nn.functional.cosine_similarity(grad, expected[name], dim=0)
        assert cos > 0.999, (name, float(cos))
    assert not any(torch.equal(got[n], expected[n]) for n in got)  # bf16 rounding did happen


class NoCheckpointing(nn.Module):
    """A model that computes a loss but is no transformers model."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        from types import SimpleNamespace

        logits = self.proj(self.embed(input_ids).mean(1))
        return SimpleNamespace(loss=nn.functional.cross_entropy(logits, labels), logits=logits)


def test_a_model_without_checkpointing_is_a_clear_error():
    with pytest.raises(ValueError, match="NoCheckpointing has neither"):
        train(NoCheckpointing(), toy_batches(1, 4), args(max_steps=1, gradient_checkpointing=True))
    model = sparseft.get_sparse_model(NoCheckpointing(), sparseft.SparseConfig(method="random", density=0.5,
                                                                               target_modules=["proj"]))
    with pytest.raises(ValueError, match="SparseModel wrapping NoCheckpointing has neither"):
        enable_gradient_checkpointing(model)
    # without the flag it trains as before
    assert train(model, toy_batches(1, 4), args(max_steps=1)).steps == 1


@pytest.mark.parametrize("field", ["bf16", "gradient_checkpointing"])
def test_the_flags_must_be_booleans(field):
    with pytest.raises(ValueError, match=f"{field} must be True or False"):
        TrainingArguments(**{field: "yes"})


def test_lora_baseline_runs_its_matmuls_in_bf16():
    pytest.importorskip("peft")
    from sparseft.app.baselines import BaselineConfig, get_baseline_model

    base = tiny_llama()
    model = get_baseline_model(base, BaselineConfig(method="lora", lora_rank=4))
    dtypes = set()
    base.lm_head.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    train(model, lm_batches(1), args(max_steps=1, bf16=True, gradient_checkpointing=True),
          optimizer=model.create_optimizer(5e-3))
    assert dtypes == {torch.bfloat16} and checkpointing_on(base)


@pytest.mark.parametrize("method", ["random", "lora"])
def test_an_nf4_base_trains_with_both_flags(method):
    """The QLoRA-like setup: a sparse run on an NF4 base, and QLoRA itself."""
    pytest.importorskip("bitsandbytes")
    base = tiny_llama()
    dtypes = set()
    if method == "random":
        model = sparseft.get_sparse_model(base, sparseft.SparseConfig(method="random", density=0.2, quantize="nf4"))
        optimizer, lr = None, 1e-2
    else:
        pytest.importorskip("peft")
        from sparseft.app.baselines import BaselineConfig, get_baseline_model

        model = get_baseline_model(base, BaselineConfig(method="lora", lora_rank=4, quantize="nf4"))
        optimizer, lr = model.create_optimizer(5e-3), 5e-3
    base.lm_head.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    result = train(model, lm_batches(4), args(epochs=4, lr=lr, bf16=True, gradient_checkpointing=True),
                   optimizer=optimizer)
    assert checkpointing_on(base) and dtypes == {torch.bfloat16}
    assert mean(result.losses[-4:]) < 0.95 * mean(result.losses[:4])
