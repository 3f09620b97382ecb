"""SpIEL-style grow-drop: swaps at the right steps, the budget kept, smallest dropped."""
from __future__ import annotations

import math

import pytest
import torch

import sparseft
from sparseft.config import GrowDropOptions
from sparseft.train import TrainingArguments, train

from test_id3 import tiny_bert, toy_batches


def test_grow_drop_swaps_every_n_steps_keeps_the_budget_and_drops_the_smallest():
    cfg = sparseft.SparseConfig(method="grow-drop", num_params=80, grow_drop=GrowDropOptions(every=3, fraction=0.25))
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


@pytest.mark.parametrize("window, observed", [(2, {3, 4, 7, 8}), (4, set(range(1, 9))), (9, set(range(1, 9)))])
def test_grow_drop_accumulates_the_last_score_window_steps_before_each_swap(window, observed):
    cfg = sparseft.SparseConfig(method="grow-drop", num_params=80, grow_drop=GrowDropOptions(every=4, score_window=window))
    model = sparseft.get_sparse_model(tiny_bert(), cfg)
    method = model.method
    seen, per_step, sums = set(), {}, {}
    step_now = [0]
    make_observer = method._dense.observer

    def observer(name):
        inner = make_observer(name)

        def observe(grad):
            seen.add(step_now[0])
            per_step.setdefault(step_now[0], {})[name] = grad.detach().float().clone()
            inner(grad)
        return observe

    method._dense.observer = observer
    begin, on_step = method.on_step_begin, method.on_step

    def on_step_begin(step, m):
        step_now[0] = step
        begin(step, m)

    def spy_on_step(step, m, optimizer=None, batch=None):
        if method._is_update(step):
            sums[step] = {n: b.clone() for n, b in method._dense.buffers.items()}
        on_step(step, m, optimizer, batch)

    method.on_step_begin, method.on_step = on_step_begin, spy_on_step
    total = 10  # swaps at 4 and 8; step 10 is the last, with no swap and no window
    train(model, toy_batches(total), TrainingArguments(lr=1e-2, max_steps=total, warmup_ratio=0.0, progress=False))
    assert seen == observed
    w = min(window, 4)
    for swap, buffers in sums.items():
        window_steps = range(swap - w + 1, swap + 1)
        for name, buf in buffers.items():
            expected = sum(per_step[s][name] for s in window_steps)
            torch.testing.assert_close(buf, expected, rtol=1e-6, atol=1e-9)
    assert set(sums) == {4, 8}
