"""Dynamic Subset Tuning (Stahlberg et al., arXiv 2411.08610; no public code).

Every optimizer step updates all entries of the tuned silos (each targeted weight matrix
is one silo); right after the step each silo is projected back onto "at most k_s entries
differ from pretrained": the k_s entries with the largest |theta' - theta0| keep their
values, every other entry is reset to its pretrained value exactly.

Working form (memory-honest, as docs/methods.md says): during training every silo carries a
*full* index (all of its entries), so ``values`` is a dense delta theta' - theta0 and the
optimizer holds dense state for it. The full-index path computes the values' gradient as
one dense matmul (no SDDMM). Extra memory per tuned weight entry, fp32: values 4 B +
gradient 4 B + Adam moments 8 B + per-entry step count 4 B = 20 B (the index buffer adds
4 B), i.e. about 5x the silo's weights; plus the dense weight gradient's matmul output.
At the end of training (``on_train_end``) the silos are compacted to the entries that
differ from pretrained, so the saved adapter is sparse like every other method's and
save/load/merge are unchanged.

Budget and rounding: the total budget B (``density``/``num_params``/``match_lora_rank``,
``resolve_budget``: round(density x targeted weights), at least 1) is split over silos in
proportion to their sizes with largest-remainder rounding (``allocate_per_layer``), so
each silo's k_s is floor or ceil of B·|silo|/total and the k_s sum to B exactly. At
density 1e-7 on MiniLM (10.8 M targeted weights, all-linear) that is B = 1: one silo gets
one entry, the others none. At density 1.0 nothing is ever reset: DST is then full fine-tuning of
the targeted matrices (step for step, with weight decay acting on the delta).

Ties in |theta' - theta0| go to the lower flat index. Optimizer state of reset entries
is kept (their moments keep accumulating, so an entry can re-enter the subset as its
gradient persists; the paper resets parameters only). ``mean_active_entries`` counts
every silo entry, since each one gets an optimizer update at every step.
"""
from __future__ import annotations

from typing import Any

import torch

from ..select import allocate_per_layer, resolve_budget
from ..tiles import expand_tiles, pool_scores, tile_count, tile_side, tile_sizes, top_tiles
from .base import Method


def project_topk_(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest |delta| (ties: lower index first), zero the rest, in place.

    Returns the boolean mask of kept entries.
    """
    flat = delta.view(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    if k <= 0:
        flat.zero_()
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    mag = flat.detach().abs()
    threshold = torch.topk(mag, k, sorted=False).values.min()
    keep = mag > threshold
    ties_left = k - int(keep.sum())
    if ties_left > 0:
        keep[torch.nonzero(mag == threshold).flatten()[:ties_left]] = True
    flat.masked_fill_(~keep, 0.0)
    return keep


class DST(Method):
    name = "dst"

    def init(self, model: Any, calibration_data: Any = None) -> None:
        shapes = model.target_shapes()
        self.budget = resolve_budget(self.config, shapes)
        self.shares = allocate_per_layer({n: o * i for n, (o, i) in shapes.items()}, self.budget)
        t = tile_side(self.config.granularity)
        if t > 1:  # whole tiles: round(B / t^2) of them, split over the silos by their tile counts
            grids = {n: tile_sizes(tuple(layer.weight.shape), t).numel() for n, layer in model.sparse_layers().items()}
            self.tile_shares = allocate_per_layer(grids, min(tile_count(self.budget, t), sum(grids.values())))
        self.dense = True
        model.set_index_sets({
            name: torch.arange(layer.weight.numel(), dtype=torch.int32)
            for name, layer in model.sparse_layers().items()
        })

    @torch.no_grad()
    def project(self, model: Any) -> dict[str, torch.Tensor]:
        """Project every silo; returns the kept entries' flat positions per silo (tiles) or
        an empty dict (entries: the nonzero values)."""
        t = tile_side(self.config.granularity)
        kept = {}
        for name, layer in model.sparse_layers().items():
            if t == 1:
                project_topk_(layer.values.data, self.shares[name])
                continue
            # Tiles: keep the silo's share of tiles of largest mean |delta| (ties: lower tile id).
            shape = tuple(layer.weight.shape)
            pooled = pool_scores(layer.values.detach().abs(), shape, t)
            k = self.tile_shares[name]
            keep = expand_tiles(top_tiles({name: pooled}, k)[name], shape, t)
            mask = torch.zeros(layer.values.numel(), dtype=torch.bool, device=layer.values.device)
            mask[keep.long()] = True
            layer.values.data.masked_fill_(~mask, 0.0)
            kept[name] = keep
        return kept

    def on_step(self, step: int, model: Any, optimizer: Any = None, batch: Any = None) -> None:
        if self.dense:
            self.project(model)

    def active_entries(self, model: Any) -> int:
        return model.num_sparse_params()  # the full silos while training

    @torch.no_grad()
    def compact(self, model: Any, optimizer: Any = None) -> None:
        """Turn the dense working form into the sparse form: keep only entries that differ
        from pretrained (at most k_s per silo)."""
        if not self.dense:
            return
        kept = self.project(model)
        index_sets = {}
        for name, layer in model.sparse_layers().items():
            index_sets[name] = kept[name] if name in kept else \
                torch.nonzero(layer.values.detach() != 0).flatten().to(torch.int32)
        model.set_index_sets(index_sets, optimizer)
        self.dense = False

    def on_train_end(self, model: Any, optimizer: Any = None) -> None:
        self.compact(model, optimizer)

    def state_dict(self) -> dict:
        state = {"budget": self.budget, "shares": self.shares, "dense": self.dense}
        if hasattr(self, "tile_shares"):
            state["tile_shares"] = self.tile_shares
        return state

    def load_state_dict(self, state: dict) -> None:
        self.budget = int(state["budget"])
        self.shares = {str(k): int(v) for k, v in state["shares"].items()}
        self.dense = bool(state["dense"])
        if "tile_shares" in state:
            self.tile_shares = {str(k): int(v) for k, v in state["tile_shares"].items()}

    def on_train_begin(self, total_steps: int | None, model: Any) -> None:
        super().on_train_begin(total_steps, model)
        if not self.dense:
            raise ValueError("this DST adapter was already compacted to its sparse form; DST cannot continue from "
                             "there (it trains the full silos). Resume the run from its training checkpoint, or "
                             "train the loaded entries further as a static mask")
