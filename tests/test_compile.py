"""torch.compile on a sparse model: one graph (no breaks), same losses, gradients and updates as eager.

The compiled forward calls the sparse layers as torch custom ops (sparseft::delta_linear and
its backward ops). The test uses the ``aot_eager`` backend (Dynamo + AOTAutograd, the parts
that see our ops; a few seconds); set SPARSEFT_TEST_INDUCTOR=1 to also run inductor, which
compiles C++ and takes a minute on a small machine.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from conftest import build_bert, build_gpt2, make_batch
from sparseft import SparseConfig, create_optimizer, get_sparse_model


def _compile_unusable_reason(backend: str) -> str | None:
    try:
        torch._dynamo.reset()
        out = torch.compile(lambda t: t * 2 + 1, backend=backend, fullgraph=True)(torch.ones(3))
        assert torch.equal(out, torch.full((3,), 3.0))
    except Exception as exc:  # no C++ compiler, unsupported Python, ...
        return f"torch.compile(backend={backend!r}) does not work here: {type(exc).__name__}: {exc}"
    return None


BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(
    not os.environ.get("SPARSEFT_TEST_INDUCTOR"), reason="slow (C++ compilation); set SPARSEFT_TEST_INDUCTOR=1"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_compiled_training_steps_match_eager(arch, backend):
    reason = _compile_unusable_reason(backend)
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()
    base = build_bert(hidden=16) if arch == "bert" else build_gpt2(hidden=16)  # eval mode: no dropout
    model = get_sparse_model(base, SparseConfig(method="random", density=0.05))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for v in model.sparse_parameters():
            v.copy_(torch.randn(v.shape, generator=gen) * 0.05)
    eager = copy.deepcopy(model)
    batch = make_batch()
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: a graph break is an error
    opts = [create_optimizer(model, lr=1e-2), create_optimizer(eager, lr=1e-2)]
    for _ in range(2):
        losses = []
        for m, opt in zip((compiled, eager), opts):
            # the loss outside the compiled model: transformers' loss helper logs a warning, a
            # graph break that is not ours
            logits = m(**batch).logits
            if arch == "bert":
                loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
            else:
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        for (name, a), (_, b) in zip(model.named_parameters(), eager.named_parameters()):
            if a.requires_grad:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(model.sparse_parameters(), eager.sparse_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the frozen weights came back exactly (the in-place weight mode restores them)
    for (name, a), (_, b) in zip(model.named_parameters(), eager.named_parameters()):
        if not a.requires_grad:
            assert torch.equal(a, b), name
