"""SpIEL-style grow-drop (Ansell et al., arXiv 2401.16405), a reference method.

Start from a seeded random index set of B entries. Every U = ``grow_drop.every`` optimizer
steps (at steps U, 2U, ... before the last step), after the optimizer step:

- drop: the n_t entries with the smallest |value| over all targeted matrices (ties: the
  earlier layer, then the lower index) leave the index set; their values are discarded
  (the delta returns to pretrained there);
- grow: the n_t entries with the largest |sum of g over the window| (the dense weight
  gradient accumulated over the last W = min(``grow_drop.score_window``, U) steps up to and
  including the update step, default 8 of 20) among entries that were not indexed before
  the drop join, at zero with fresh optimizer state;
- n_t = round(f_t · B), f_t = f_0 · (1 + cos(pi · t / T)) / 2 (cosine decay from
  f_0 = ``grow_drop.fraction``, default 0.2, to 0 at the last step T).

Surviving entries keep values and optimizer state, so the total stays B. Only the W window
steps observe the dense gradient (one dense matmul per targeted layer instead of the
sparse gradient, and one dense float32 accumulator per layer while the window lasts); the
other steps cost what a static mask costs. SpIEL-AG accumulates the same way, over a few
steps before each regrowth (its public code: 5 of every 20 steps); ``grow_drop.score_window=U``
accumulates over whole intervals.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..scoring import GradientSum
from ..select import resolve_budget, select_topk
from ..tiles import (expand_tiles, indexed_tiles, pool_entry_values, pool_scores, select_streamed, tile_count,
                     tile_of_entries, tile_side, top_tiles)
from .base import Method
from .id3 import grow
from .static import scores_by_layer, weight_shapes


class GrowDrop(Method):
    name = "grow-drop"

    def init(self, model: Any, calibration_data: Any = None) -> None:
        cfg = self.config
        layers = model.sparse_layers()
        self.budget = resolve_budget(cfg, model.target_shapes())
        model.set_index_sets(select_streamed(scores_by_layer("random", layers, seed=cfg.seed), weight_shapes(layers),
                                             self.budget, cfg.selection, cfg.granularity))
        self._dense = GradientSum()
        self.swapped: list[tuple[int, int]] = []  # (step, entries swapped)

    def fraction(self, step: int) -> float:
        total = self.total_steps or step
        return self.config.grow_drop.fraction * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    def _is_update(self, step: int) -> bool:
        every = self.config.grow_drop.every
        return step % every == 0 and (self.total_steps is None or step < self.total_steps)

    def in_window(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) feeds the next swap's gradient sum."""
        every = self.config.grow_drop.every
        swap = -(-step // every) * every  # the next update step, ``step`` itself included
        return swap - step < min(self.config.grow_drop.score_window, every) and self._is_update(swap)

    def on_step_begin(self, step: int, model: Any) -> None:
        if self.in_window(step):
            self._dense.arm(model.sparse_layers())

    def on_before_update(self, step: int, model: Any, optimizer: Any = None) -> None:
        self._dense.disarm(model.sparse_layers())

    @torch.no_grad()
    def on_step(self, step: int, model: Any, optimizer: Any = None, batch: Any = None) -> None:
        if not self._is_update(step):
            return
        grads = self._dense.pop()
        layers = model.sparse_layers()
        t = tile_side(self.config.granularity)
        if t > 1:
            self._swap_tiles(step, model, optimizer, grads, t)
            return
        n = min(int(round(self.fraction(step) * self.budget)), self.budget)
        if n <= 0 or not grads:
            return
        # drop: smallest |value| globally
        neg_mag = {name: -layer.values.detach().float().abs() for name, layer in layers.items()}
        dropped = select_topk(neg_mag, n, "global", consume=True)
        keep, grow_scores = {}, {}
        for name, layer in layers.items():
            keep[name] = torch.ones(layer.num_entries, dtype=torch.bool, device=layer.indices.device)
            keep[name][dropped[name].long()] = False
            # the window's sum is ours (popped): its magnitude is the score, in place
            score = grads[name].reshape(-1).abs_() if name in grads else torch.zeros(layer.weight_numel)
            score[layer.indices.long()] = float("-inf")  # only entries not indexed before the drop
            grow_scores[name] = score
        grow(model, select_topk(grow_scores, n, "global", consume=True), optimizer, keep=keep)
        self.swapped.append((step, n))

    def _swap_tiles(self, step: int, model: Any, optimizer: Any, grads: dict, t: int) -> None:
        """The same swap in whole tiles: drop the n tiles of smallest mean |value|, grow the n
        tiles of largest mean |sum of g| among tiles not indexed before the drop, with
        n = round(f_t * round(B / t^2))."""
        layers = model.sparse_layers()
        shapes = weight_shapes(layers)
        n = min(int(round(self.fraction(step) * tile_count(self.budget, t))), tile_count(self.budget, t))
        if n <= 0 or not grads:
            return
        neg_mag, grow_scores, keep = {}, {}, {}
        for name, layer in layers.items():
            shape = shapes[name]
            neg_mag[name] = -pool_entry_values(layer.values.detach().abs(), layer.indices, shape, t)
            indexed = indexed_tiles(layer.indices, shape, t)
            score = pool_scores(grads[name].reshape(-1).abs_(), shape, t) if name in grads else \
                torch.zeros(indexed.numel())
            score[indexed] = float("-inf")
            grow_scores[name] = score
        dropped = top_tiles(neg_mag, n)
        for name, layer in layers.items():
            keep[name] = ~torch.isin(tile_of_entries(layer.indices, shapes[name], t), dropped[name])
        grown = top_tiles(grow_scores, n)
        grow(model, {name: expand_tiles(grown[name], shapes[name], t) for name in layers}, optimizer, keep=keep)
        self.swapped.append((step, n))

    def on_train_end(self, model: Any, optimizer: Any = None) -> None:
        self._dense.disarm(model.sparse_layers())
        self._dense.pop()

    def state_dict(self) -> dict:
        # The window's partial gradient sum too: a resume inside a window must regrow the same.
        return {"budget": self.budget, "swapped": self.swapped, "window_grads": dict(self._dense.buffers)}

    def load_state_dict(self, state: dict) -> None:
        self.budget = int(state["budget"])
        self.swapped = [tuple(s) for s in state.get("swapped", [])]
        if not hasattr(self, "_dense"):  # restored without init (a loaded adapter)
            self._dense = GradientSum()
        self._dense.buffers = dict(state.get("window_grads", {}))
