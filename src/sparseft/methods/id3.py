"""ID3: incremental unmasking by the d3 score (Agarwal et al., arXiv 2408.14470).

Training starts with no entries. Unmasking happens at the "events" t = 1, 1+K, 1+2K, ...
(K = ``id3.unmask_every``, default 1), E = ceil(T / K) events for T optimizer steps. Event j
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
from ..select import resolve_budget, select_topk
from ..tiles import expand_tiles, indexed_tiles, pool_scores, tile_count, tile_side, top_tiles
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


def d3_score(grad: torch.Tensor, weight: torch.Tensor | None, epsilon: float = 1e-3, exponent: float = 0.0) -> torch.Tensor:
    """d3 = |g| / (|w| + eps)^e, flat float32 (e = 0 gives |g|)."""
    score = grad.detach().float().abs().reshape(-1)
    if exponent:
        score = score / (weight.detach().float().abs().reshape(-1) + epsilon).pow(exponent)
    return score


def grow(model: Any, new_entries: Mapping[str, torch.Tensor], optimizer: Any = None,
         dense_grads: Mapping[str, torch.Tensor] | None = None,
         keep: Mapping[str, torch.Tensor] | None = None) -> None:
    """Add ``new_entries`` (positions not yet indexed) to the layers' index sets in place.

    Existing entries keep values, gradients and optimizer state; new ones start at zero
    with fresh optimizer state. With ``dense_grads`` the new entries also get their
    gradient for the coming optimizer step. ``keep`` (a bool mask over a layer's current
    entries) drops the others first; their values are discarded.

    The outcome of ``model.set_index_sets`` with the new sets, but built by merging two
    sorted sets: no set-membership searches (this runs at every step of ID3).
    """
    layers = model.sparse_layers()
    # transformers.Trainer hands callbacks accelerate's wrapper around the optimizer.
    while optimizer is not None and not hasattr(optimizer, "remap_entries") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    keep = keep or {}
    for name, layer in layers.items():
        if name not in keep and (name not in new_entries or new_entries[name].numel() == 0):
            continue
        if optimizer is not None and not hasattr(optimizer, "remap_entries") and optimizer.state.get(layer.values):
            raise RuntimeError("changing index sets during training needs per-entry optimizer state: "
                               "use sparseft.create_optimizer (SparseAdamW)")
        old = layer.indices
        kept = torch.nonzero(keep[name]).flatten() if name in keep else None
        survivors = old if kept is None else old[kept]
        add = torch.sort(new_entries.get(name, old[:0]).to(old.device, torch.int32)).values
        at = torch.searchsorted(survivors, add)  # survivors before each new entry
        if survivors.numel():
            fresh = survivors[at.clamp(max=survivors.numel() - 1)] != add
            add, at = add[fresh], at[fresh]  # an entry already there stays as it is
        n = survivors.numel() + add.numel()
        new_pos = at + torch.arange(add.numel(), device=old.device)
        is_new = torch.zeros(n, dtype=torch.bool, device=old.device)
        is_new[new_pos] = True
        kept_pos = torch.nonzero(~is_new).flatten()
        idx = torch.empty(n, dtype=torch.int32, device=old.device)
        idx[new_pos] = add
        idx[kept_pos] = survivors
        values = torch.zeros(n, dtype=layer.values.dtype, device=old.device)
        old_values, old_grad = layer.values.detach(), layer.values.grad
        values[kept_pos] = old_values if kept is None else old_values[kept]
        layer.set_indices(idx, values)
        if optimizer is not None and hasattr(optimizer, "remap_entries"):
            from_pos = torch.arange(old.numel(), device=old.device) if kept is None else kept
            optimizer.remap_entries(layer.values, from_pos, kept_pos)
        if dense_grads is not None:
            dense = dense_grads[name].reshape(-1)
            grad = torch.empty(n, dtype=layer.values.dtype, device=old.device)
            grad[new_pos] = dense[add.long()].to(grad.dtype)
            # Entries indexed before keep the gradient the sparse path computed for them.
            if old_grad is None or not old_grad.numel():
                grad[kept_pos] = dense[survivors.long()].to(grad.dtype)
            else:
                grad[kept_pos] = (old_grad if kept is None else old_grad[kept]).to(grad.dtype)
            layer.values.grad = grad


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
        t = tile_side(self.config.granularity)
        # With tiles the schedule counts whole tiles: round(B / t^2) of them in all.
        units = self.budget if t == 1 else tile_count(self.budget, t)
        counts = unmask_schedule(total_steps, units, self.config.id3.unmask_every)
        if model.num_sparse_params() and self.counts is not None and counts != self.counts:
            # A loaded ID3 adapter continued with another schedule would unmask past its budget.
            raise ValueError(
                f"this ID3 adapter already unmasked {model.num_sparse_params()} entries on a {len(self.counts)}-step "
                f"schedule; continuing it over {total_steps} steps is not supported. Resume the run from its "
                "training checkpoint (same steps), or train the loaded entries further as a static mask")
        self.counts = counts

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
        t = tile_side(cfg.granularity)
        scores = {}
        for name, layer in layers.items():
            s = d3_score(grads[name], full_tensor(layer.weight) if cfg.id3.d3_exponent else None,
                         cfg.id3.d3_epsilon, cfg.id3.d3_exponent)
            if t > 1:  # whole tiles compete by their mean score; indexed tiles are out
                shape = tuple(layer.weight.shape)
                s = pool_scores(s, shape, t)
                s[indexed_tiles(layer.indices, shape, t)] = float("-inf")
            else:
                s[layer.indices.long()] = float("-inf")  # only still-masked entries compete
            scores[name] = s
        if t > 1:
            picked = top_tiles(scores, k)
            new = {name: expand_tiles(picked[name], tuple(layer.weight.shape), t) for name, layer in layers.items()}
        else:
            new = select_topk(scores, k, "global", consume=True)
        grow(model, new, optimizer, grads)

    def on_train_end(self, model: Any, optimizer: Any = None) -> None:
        self._dense.disarm(model.sparse_layers())
        self._dense.pop()

    def state_dict(self) -> dict:
        return {"budget": self.budget, "counts": self.counts}

    def load_state_dict(self, state: dict) -> None:
        self.budget = int(state["budget"])
        self.counts = None if state.get("counts") is None else [int(c) for c in state["counts"]]
        if not hasattr(self, "_dense"):  # restored without init (a loaded adapter)
            self._dense = GradientSum()
