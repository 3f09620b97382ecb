"""ID3: incremental unmasking by the d3 score (Agarwal et al., arXiv 2408.14470).

Training starts with no entries. Unmasking happens at the "events" t = 1, 1+K, 1+2K, ...
(K = ``unmask_every``, default 1), E = ceil(T / K) events for T optimizer steps. Event j
(0-based) unmasks floor(B / E) entries, plus one for the first B mod E events, so exactly
B entries are active after the last event (at step T when K = 1). Entries are never
dropped.

Convention (exact): at an event step t the dense weight gradients of step t's batch are
captured by grad observers armed in ``on_step_begin(t)``; once the backward pass is done
(``on_before_update(t)``, before clipping and the optimizer step) the top-k of
d3 = |g| / (|w| + eps)^e over still-masked entries (one global top-k over all targeted
matrices; ties go to the earlier layer, then the lower index) are added to the index sets,
and they receive their gradient from that same dense gradient. So an entry unmasked at
step t gets its first update at step t, from step t's batch; at step t the number of
trained entries is the cumulative count after t's event, B at step T, and B(T+1)/(2T)
on average over training (about B/2: the paper's "half the gradient updates").

Growing is done in place by ``SparseModel.set_index_sets(..., optimizer)``: surviving
entries keep their values and their ``SparseAdamW`` state, new ones start at zero with a
per-entry step count of 0, so their first update has the bias correction of a fresh Adam.
The dense gradient (one extra matmul per targeted layer) is built only on event steps.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..distributed import full_tensor
from ..scoring import GradientSum
from ..select import resolve_budget
from .base import Method


# target_modules for a peft LoRA model: the LoRA A/B matrices of every adapter. With it,
# ID3 (or any method) trains a sparse subset of the adapter's entries: each lora_A/lora_B
# Linear gets a sparse delta on top of its initial weights (A random, B zero), so the
# saved sparse adapter holds deltas relative to the LoRA initialisation (rebuild the peft
# model with the same seed, or keep its initial weights, to load it).
LORA_TARGETS = r".*\.lora_[AB]\.[^.]+"


def unmask_schedule(total_steps: int, budget: int, every: int = 1) -> list[int]:
    """Entries unmasked at each optimizer step 1..T (zeros between events); sums to B."""
    if total_steps < 1 or every < 1 or budget < 0:
        raise ValueError(f"bad ID3 schedule: total_steps={total_steps}, budget={budget}, every={every}")
    events = math.ceil(total_steps / every)
    base, extra = divmod(budget, events)
    counts = [0] * total_steps
    for j in range(events):
        counts[j * every] = base + (1 if j < extra else 0)
    return counts


def d3_score(grad: torch.Tensor, weight: torch.Tensor, epsilon: float = 1e-3, exponent: float = 0.0) -> torch.Tensor:
    """d3 = |g| / (|w| + eps)^e, flat float32 (e = 0 gives |g|)."""
    score = grad.detach().float().abs().reshape(-1)
    if exponent:
        score = score / (weight.detach().float().abs().reshape(-1) + epsilon).pow(exponent)
    return score


def global_topk(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Sorted int32 positions of the ``k`` largest scores over all layers.

    Same result as ``select.select_topk(..., "global")`` (ties go to the earlier layer,
    then the lower index; NaN counts as lowest) but built for a small ``k`` taken often: the
    threshold comes from per-layer ``topk`` candidates, not a 32-round bisection.
    """
    names = list(scores)
    flat = {n: torch.nan_to_num(scores[n].reshape(-1).float(), nan=float("-inf")) for n in names}
    if k <= 0:
        return {n: torch.zeros(0, dtype=torch.int32, device=flat[n].device) for n in names}
    total = sum(s.numel() for s in flat.values())
    if k > total:
        raise ValueError(f"cannot take {k} entries from {total} candidates")
    candidates = torch.cat([torch.topk(s, min(k, s.numel()), sorted=False).values.cpu() for s in flat.values() if s.numel()])
    threshold = torch.topk(candidates, k).values[-1].item()
    ties_left = k - sum(int((s > threshold).sum()) for s in flat.values())
    chosen = {}
    for n in names:
        mask = flat[n] > threshold
        if ties_left > 0:
            ties = torch.nonzero(flat[n] == threshold).flatten()[:ties_left]
            mask[ties] = True
            ties_left -= ties.numel()
        chosen[n] = torch.nonzero(mask).flatten().to(torch.int32)
    return chosen


def grow(model: Any, new_entries: Mapping[str, torch.Tensor], optimizer: Any = None,
         dense_grads: Mapping[str, torch.Tensor] | None = None) -> None:
    """Add ``new_entries`` (positions not yet indexed) to the layers' index sets in place.

    Existing entries keep values, gradients and optimizer state; new ones start at zero
    with fresh optimizer state. With ``dense_grads`` the new entries also get their
    gradient for the coming optimizer step.
    """
    layers = model.sparse_layers()
    old_grads = {}
    targets = {}
    for name, add in new_entries.items():
        if add.numel() == 0:
            continue
        layer = layers[name]
        old_grads[name] = layer.values.grad
        targets[name] = torch.unique(torch.cat([layer.indices, add.to(layer.indices.device, torch.int32)]))
    model.set_index_sets(targets, optimizer)
    if dense_grads is None:
        return
    for name, idx in targets.items():
        layer = layers[name]
        grad = dense_grads[name].reshape(-1)[idx.long()].to(layer.values.dtype)
        old = old_grads[name]
        if old is not None and old.numel():
            # Entries indexed before keep the gradient the sparse path computed for them.
            grad[_old_positions(idx, new_entries[name])] = old.to(grad.dtype)
        layer.values.grad = grad


def _old_positions(idx: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
    """Positions in the merged, sorted ``idx`` of the entries that were there before."""
    return torch.nonzero(~torch.isin(idx, added.to(idx.device, torch.int32))).flatten()


class ID3(Method):
    """Incremental unmasking; see the module docstring for the exact convention."""

    name = "id3"

    def init(self, model: Any, calibration_data: Any = None) -> None:
        self.budget = resolve_budget(self.config, model.target_shapes())
        model.set_index_sets({n: torch.zeros(0, dtype=torch.int32) for n in model.target_names})
        self.counts: list[int] | None = None
        self._dense = GradientSum()

    def on_train_begin(self, total_steps: int | None, model: Any) -> None:
        super().on_train_begin(total_steps, model)
        if total_steps is None or total_steps < 1:
            raise ValueError("ID3 needs the planned number of optimizer steps (train with sparseft.train or SparseCallback)")
        self.counts = unmask_schedule(total_steps, self.budget, self.config.unmask_every)

    def _to_unmask(self, step: int) -> int:
        if self.counts is None:
            raise RuntimeError("ID3: on_train_begin(total_steps, model) was not called")
        return self.counts[step - 1] if 1 <= step <= len(self.counts) else 0

    def on_step_begin(self, step: int, model: Any) -> None:
        if self._to_unmask(step):
            self._dense.pop()
            self._dense.arm(model.sparse_layers())

    def on_before_update(self, step: int, model: Any, optimizer: Any = None) -> None:
        k = self._to_unmask(step)
        if not k:
            return
        layers = model.sparse_layers()
        self._dense.disarm(layers)
        grads = self._dense.pop()
        if set(grads) != set(layers):
            raise RuntimeError(f"ID3: no dense gradient for {sorted(set(layers) - set(grads))[:3]} at step {step}")
        cfg = self.config
        scores = {}
        for name, layer in layers.items():
            s = d3_score(grads[name], full_tensor(layer.weight) if cfg.d3_exponent else layer.weight,
                         cfg.d3_epsilon, cfg.d3_exponent)
            s[layer.indices.long()] = float("-inf")  # only still-masked entries compete
            scores[name] = s
        grow(model, global_topk(scores, k), optimizer, grads)

    def on_train_end(self, model: Any, optimizer: Any = None) -> None:
        self._dense.disarm(model.sparse_layers())
        self._dense.pop()

    def state_dict(self) -> dict:
        return {"budget": self.budget, "counts": self.counts}
