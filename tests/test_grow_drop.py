"""SpIEL-style grow-drop: swaps at the right steps, the budget kept, smallest dropped."""
from __future__ import annotations

import math

import pytest
import torch

import sparseft
from sparseft.train import TrainingArguments, train

from test_id3 import tiny_bert, toy_batches


def test_grow_drop_swaps_every_n_steps_keeps_the_budget_and_drops_the_smallest():
    cfg = sparseft.SparseConfig(method="grow-drop", num_params=80, grow_drop_every=3, grow_drop_fraction=0.25)
    model = sparseft.get_sparse_model(tiny_bert(), cfg)
    method = model.method
    assert model.num_sparse_params() == 80
    checks = []
    inner = method.on_step

    def on_step(step, m, optimizer=None, batch=None):
        before = {n: (l.indices.clone(), l.values.detach().clone()) for n, l in m.sparse_layers().items()}
        inner(step, m, optimizer, batch)
        after = {n: (l.indices.clone(), l.values.detach().clone()) for n, l in m.sparse_layers().items()}
        assert m.num_sparse_params() == 80
        gone = torch.cat([b[1][~torch.isin(b[0], after[n][0])].abs() for n, b in before.items()])
        stayed = torch.cat([b[1][torch.isin(b[0], after[n][0])].abs() for n, b in before.items()])
        fresh = torch.cat([a[1][~torch.isin(a[0], before[n][0])] for n, a in after.items()])
        checks.append((step, gone.numel()))
        if gone.numel():
            assert float(gone.max()) <= float(stayed.min())  # the smallest |value| left
            assert bool((fresh == 0).all()) and fresh.numel() == gone.numel()  # regrown at zero

    method.on_step = on_step
    total = 10
    train(model, toy_batches(total), TrainingArguments(lr=1e-2, max_steps=total, warmup_ratio=0.0, progress=False))
    expected = {s: round(80 * 0.25 * 0.5 * (1 + math.cos(math.pi * s / total))) for s in (3, 6, 9)}
    assert expected == {3: 16, 6: 7, 9: 0}  # the cosine decay; nothing left to swap by step 9
    assert {s: n for s, n in checks if n} == {s: n for s, n in expected.items() if n}
    assert method.swapped == [(s, n) for s, n in expected.items() if n]
