"""Budgets and top-k rules: how many entries, and which, given per-layer scores.

Scores arrive as one flat float tensor per targeted weight. No tensor larger than the
largest weight is ever built: the global threshold is the k-th largest of the scores'
order-preserving integer keys, taken among the keys at or above a guess from a sample
when few enough pass it, else found by radix selection, counting layer by layer.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .config import DEFAULT_DENSITY, ConfigError, SparseConfig


def lora_equivalent_params(shapes: Mapping[str, tuple[int, int]], rank: int) -> int:
    """Trainable parameters of LoRA of ``rank`` on weights of these (out, in) shapes."""
    return sum(rank * (out_f + in_f) for out_f, in_f in shapes.values())


def resolve_budget(config: SparseConfig, shapes: Mapping[str, tuple[int, int]]) -> int:
    """Total number of sparse entries the config asks for over these targets."""
    total = sum(o * i for o, i in shapes.values())
    if config.num_params is not None:
        budget = config.num_params
    elif config.match_lora_rank is not None:
        budget = lora_equivalent_params(shapes, config.match_lora_rank)
    else:
        density = DEFAULT_DENSITY if config.density is None else config.density
        budget = max(int(round(density * total)), 1)
    if budget > total:
        raise ConfigError(f"the budget of {budget:,} entries exceeds the {total:,} targeted weights")
    return budget


def allocate_per_layer(sizes: Mapping[str, int], budget: int) -> dict[str, int]:
    """Split ``budget`` over layers in proportion to their sizes, summing exactly.

    Largest-remainder rounding; ties go to the earlier layer, so it is deterministic.
    """
    total = sum(sizes.values())
    if budget > total:
        raise ConfigError(f"the budget of {budget:,} entries exceeds the {total:,} targeted weights")
    names = list(sizes)
    exact = [budget * sizes[n] / total for n in names]
    shares = [int(e) for e in exact]
    remainder = budget - sum(shares)
    order = sorted(range(len(names)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order:
        if remainder == 0:
            break
        if shares[i] < sizes[names[i]]:
            shares[i] += 1
            remainder -= 1
    return dict(zip(names, shares))


def _order_keys(scores: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """int32 keys with the same order as the float32 scores (NaN counts as lowest).

    With ``inplace`` (and a contiguous float32 tensor) the scores' own storage becomes
    the keys, so no second copy of the scores is built.
    """
    s = scores.detach().reshape(-1)
    if not (inplace and s.dtype == torch.float32 and s.is_contiguous()):
        s = s.float().clone()
    s.nan_to_num_(nan=float("-inf"))
    s.add_(0.0)  # turns -0.0 into +0.0 so equal scores get equal keys
    bits = s.view(torch.int32)
    neg = bits < 0
    bits[neg] = bits[neg] ^ 0x7FFFFFFF
    return bits


# _kth_largest_key_sampled guesses from about this many keys, spread over all layers, and
# is tried from this many keys in all.
SAMPLE_SIZE = 1 << 16
SAMPLED_MIN_TOTAL = 1 << 18


def sample_plan(total: int, k: int) -> tuple[int, int]:
    """For a top-k guessed from a strided sample of ``total`` scores: the stride, and how
    many of the sample's largest to pass (a margin over the expected k / stride, so that
    the guess lets at least k through almost always)."""
    # An odd stride not divisible by 3 keeps the sample from lining up with matrix rows
    # (their lengths are mostly 2^a * 3^b): a spread-out sample gives a tighter guess.
    stride = max(1, total // SAMPLE_SIZE)
    stride += (stride % 2 == 0)
    stride += 2 * (stride % 3 == 0)
    want = k / stride
    return stride, int(1.5 * want + 4 * want ** 0.5 + 8)


def _kth_largest_key_sampled(keys: Mapping[str, torch.Tensor], names, k: int) -> int | None:
    """The k-th largest key, found among the keys at or above a guess taken from a strided
    sample; None when the guess lets fewer than k keys through, or more than the largest
    layer holds (then the radix selection answers, within its memory bound)."""
    total = sum(keys[n].numel() for n in names)
    if total < SAMPLED_MIN_TOTAL or k <= 0:
        return None
    stride, take = sample_plan(total, k)
    sample = torch.cat([keys[n][::stride] for n in names])
    if take >= sample.numel():
        return None
    guess = torch.topk(sample, take).values[-1]
    limit = max(keys[n].numel() for n in names)
    above, found = [], 0
    for n in names:
        above.append(keys[n][keys[n] >= guess])
        found += above[-1].numel()
        if found > limit:
            return None
    if found < k:
        return None
    return int(torch.topk(torch.cat(above), k).values[-1])


def _kth_largest_key(key_fn, names, k: int) -> int:
    """The k-th largest key over all layers (radix selection, one byte per pass).

    Four passes over the keys, each building a 256-bin histogram of the next byte among
    the keys that share the bytes fixed so far; only one layer's temporaries exist at once.
    """
    prefix = 0  # the high bytes of the answer, as an unsigned 32-bit number
    for shift in (24, 16, 8, 0):
        counts = torch.zeros(256, dtype=torch.int64)
        for n in names:
            u = key_fn(n).to(torch.int64) + 2**31  # order-preserving, unsigned
            if shift < 24:
                u = u[(u >> (shift + 8)) == prefix]
            counts += torch.bincount((u >> shift) & 0xFF, minlength=256).cpu()
            del u
        from_top = counts.flip(0).cumsum(0)
        j = int(torch.nonzero(from_top >= k)[0])
        byte = 255 - j
        k -= int(from_top[j] - counts[byte])  # entries in higher bins are all above
        prefix = (prefix << 8) | byte
    return prefix - 2**31


def select_topk(scores: Mapping[str, torch.Tensor], budget: int, selection: str = "global",
                consume: bool = False) -> dict[str, torch.Tensor]:
    """Sorted int32 indices of the top-``budget`` entries.

    ``global``: one top-k over all layers. ``per-layer``: each layer gets a share of the
    budget proportional to its size. Ties are broken by layer order, then index order.
    With ``consume``, float32 score tensors are overwritten (they become order keys) and
    released layer by layer, so selection adds no second copy of the scores.
    """
    names = list(scores)
    if selection == "per-layer":
        shares = allocate_per_layer({n: scores[n].numel() for n in names}, budget)
        return {n: select_topk({n: scores[n]}, shares[n], "global", consume)[n] for n in names}
    if selection != "global":
        raise ConfigError(f"unknown selection {selection!r}")
    total = sum(scores[n].numel() for n in names)
    if budget > total:
        raise ConfigError(f"the budget of {budget:,} entries exceeds the {total:,} candidates")
    if budget <= 0:
        return {n: torch.zeros(0, dtype=torch.int32, device=scores[n].device) for n in names}
    keys = {n: _order_keys(scores[n], inplace=consume) for n in names}
    return _topk_of_keys(keys, names, budget)


def _topk_of_keys(keys: dict[str, torch.Tensor], names: list[str], budget: int) -> dict[str, torch.Tensor]:
    """Sorted int32 positions of the top-``budget`` keys (ties: layer order, then position);
    ``keys`` is emptied as it goes."""
    threshold = _kth_largest_key_sampled(keys, names, budget)
    if threshold is None:
        threshold = _kth_largest_key(keys.__getitem__, names, budget)
    ties_left = budget - sum(int((keys[n] > threshold).sum()) for n in names)
    chosen = {}
    for n in names:
        key = keys.pop(n)
        mask = key > threshold
        if ties_left > 0:
            tie_positions = torch.nonzero(key == threshold).flatten()[:ties_left]
            mask[tie_positions] = True
            ties_left -= tie_positions.numel()
        del key
        chosen[n] = torch.nonzero(mask).flatten().to(torch.int32)
    return chosen


class StreamingTopK:
    """``select_topk`` over scores that arrive one layer at a time, in layer order.

    Gives exactly the index sets ``select_topk`` would give on all the scores at once
    (same ties rule), without holding them: ``global`` keeps a running set of at most
    ``budget`` candidates (an int32 key and an int32 index each) and prunes it to the
    top ``budget`` after every layer; ``per-layer`` chooses each layer's share on arrival.
    ``add`` consumes the float32 scores (they become order keys).
    """

    def __init__(self, sizes: Mapping[str, int], budget: int, selection: str = "global"):
        if selection not in ("global", "per-layer"):
            raise ConfigError(f"unknown selection {selection!r}")
        total = sum(sizes.values())
        if budget > total:
            raise ConfigError(f"the budget of {budget:,} entries exceeds the {total:,} candidates")
        self.names = list(sizes)
        self.sizes = dict(sizes)
        self.budget = max(int(budget), 0)
        self.selection = selection
        self.shares = allocate_per_layer(self.sizes, self.budget) if selection == "per-layer" else None
        self._next = 0
        self._keys: dict[str, torch.Tensor] = {}
        self._index: dict[str, torch.Tensor] = {}

    def add(self, name: str, scores: torch.Tensor) -> None:
        if self._next >= len(self.names) or self.names[self._next] != name:
            raise ValueError(f"layer {name!r} arrived out of order")
        if scores.numel() != self.sizes[name]:
            raise ValueError(f"layer {name!r}: {scores.numel()} scores for {self.sizes[name]} entries")
        self._next += 1
        k = self.shares[name] if self.shares is not None else min(self.budget, scores.numel())
        if k <= 0:
            self._index[name] = torch.zeros(0, dtype=torch.int32, device=scores.device)
            return
        keys = _order_keys(scores, inplace=True)
        index = _topk_of_keys({name: keys}, [name], k)[name] if k < keys.numel() else \
            torch.arange(keys.numel(), dtype=torch.int32, device=keys.device)
        self._index[name] = index
        if self.shares is not None:
            return
        self._keys[name] = keys[index.long()]
        del keys
        held = [n for n in self._keys]
        if sum(self._keys[n].numel() for n in held) > self.budget:
            keep = _topk_of_keys(dict(self._keys), held, self.budget)
            for n in held:
                pos = keep[n].long()
                self._keys[n] = self._keys[n][pos]
                self._index[n] = self._index[n][pos]

    def result(self) -> dict[str, torch.Tensor]:
        """The index sets (every layer must have been added)."""
        if self._next != len(self.names):
            raise ValueError(f"only {self._next} of {len(self.names)} layers were scored")
        self._keys.clear()
        return {n: self._index[n] for n in self.names}
