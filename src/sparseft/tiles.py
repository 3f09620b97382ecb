"""Tile-structured masks: index sets made of whole, aligned t x t tiles of a weight.

A tile mask is still stored as a flat, sorted int32 index (every entry of every chosen
tile), so saving, loading, merging and every method's index surgery are unchanged; only
the choice of entries is coarser. What it buys is arithmetic: the values' gradient of a
tiled layer is a batch of small dense matmuls (``blocksparse.py``), not an element-wise
SDDMM.

Rules (the same for every scorer and method):

* **Pooling.** A tile's score is the mean of its entries' scores. For full tiles the mean
  ranks exactly as the sum would; the mean also lets a partial tile at the right or bottom
  edge of a weight whose sides are not multiples of t compete on its per-entry merit, which
  is what the budget (counted in entries) pays for. NaN scores count as lowest.
* **Budget.** The budget B still counts entries (``density``, ``num_params`` or
  ``match_lora_rank``). Static and dynamic selections take tiles in score order and stop at
  the prefix whose entry count is closest to B (ties: fewer entries; at least one tile), so
  on weights whose sides are multiples of t they train round(B / t^2) full tiles: B up to
  half a tile (t^2 / 2 entries) either way (an exact half rounds down). ID3, grow-drop and DST move whole tiles and
  count them as round(B / t^2) (DST splits that count over its silos in proportion to their
  tiles, largest remainder first).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

GRANULARITIES = {"entry": 1, "tile16": 16, "tile32": 32}


def tile_side(granularity: str) -> int:
    """The tile side t of a granularity (1 for ``entry``)."""
    try:
        return GRANULARITIES[granularity]
    except KeyError:
        from .config import ConfigError  # here, not at the top: the delta layout imports this module

        raise ConfigError(f"granularity={granularity!r}; choose one of {', '.join(GRANULARITIES)}") from None


def tile_grid(shape: tuple[int, int], t: int) -> tuple[int, int]:
    """Tiles along each side of a (rows x cols) weight (partial edge tiles included)."""
    rows, cols = shape
    return -(-rows // t), -(-cols // t)


def tile_sizes(shape: tuple[int, int], t: int, device=None) -> torch.Tensor:
    """Entries of each tile, row-major over the tile grid (int64; t*t except at the edges)."""
    rows, cols = shape
    tr, tc = tile_grid(shape, t)
    h = torch.full((tr,), t, dtype=torch.int64, device=device)
    w = torch.full((tc,), t, dtype=torch.int64, device=device)
    h[-1] = rows - (tr - 1) * t
    w[-1] = cols - (tc - 1) * t
    return (h[:, None] * w[None, :]).reshape(-1)


def pool_scores(scores: torch.Tensor, shape: tuple[int, int], t: int) -> torch.Tensor:
    """Mean of the per-entry ``scores`` (flat over a rows x cols weight) in each t x t tile,
    row-major over the tile grid, float32; NaN becomes -inf."""
    rows, cols = shape
    s = scores.detach().reshape(rows, cols).float().nan_to_num(nan=float("-inf"), posinf=float("inf"))
    tr, tc = tile_grid(shape, t)
    if rows % t or cols % t:
        padded = s.new_zeros(tr * t, tc * t)
        padded[:rows, :cols] = s
        s = padded
    sums = s.view(tr, t, tc, t).sum(dim=(1, 3)).reshape(-1)
    return sums / tile_sizes(shape, t, sums.device).to(sums.dtype)


def expand_tiles(tiles: torch.Tensor, shape: tuple[int, int], t: int) -> torch.Tensor:
    """Sorted int32 flat positions of every entry of the given tiles (row-major tile ids)."""
    rows, cols = shape
    _, tc = tile_grid(shape, t)
    tiles = tiles.long().reshape(-1)
    offs = torch.arange(t, device=tiles.device)
    r = (tiles // tc)[:, None] * t + offs  # (n, t)
    c = (tiles % tc)[:, None] * t + offs
    flat = r[:, :, None] * cols + c[:, None, :]
    valid = (r < rows)[:, :, None] & (c < cols)[:, None, :]
    return torch.sort(flat[valid]).values.to(torch.int32)


def tile_of_entries(indices: torch.Tensor, shape: tuple[int, int], t: int) -> torch.Tensor:
    """The row-major tile id (int64) of each flat position in ``indices``."""
    _, cols = shape
    _, tc = tile_grid(shape, t)
    flat = indices.long()
    return (flat // cols // t) * tc + (flat % cols) // t


def indexed_tiles(indices: torch.Tensor, shape: tuple[int, int], t: int) -> torch.Tensor:
    """Boolean mask over the tile grid: tiles that hold at least one indexed entry."""
    tr, tc = tile_grid(shape, t)
    mask = torch.zeros(tr * tc, dtype=torch.bool, device=indices.device)
    mask[tile_of_entries(indices, shape, t)] = True
    return mask


def pool_entry_values(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int], t: int,
                      fill: float = float("inf")) -> torch.Tensor:
    """Mean of per-entry ``values`` (aligned with ``indices``) over each tile's indexed entries;
    ``fill`` for tiles with none."""
    tr, tc = tile_grid(shape, t)
    ids = tile_of_entries(indices, shape, t)
    sums = torch.zeros(tr * tc, dtype=torch.float32, device=values.device).index_add_(0, ids, values.float())
    counts = torch.zeros(tr * tc, dtype=torch.float32, device=values.device).index_add_(
        0, ids, torch.ones_like(values, dtype=torch.float32))
    out = sums / counts.clamp_min(1)
    out[counts == 0] = fill
    return out


def tile_count(budget: int, t: int) -> int:
    """Whole tiles for a budget of ``budget`` entries: B / t^2 rounded to the nearest whole
    number (halves down, as the prefix rule), at least one."""
    return max(1, (2 * budget + t * t - 1) // (2 * t * t)) if budget > 0 else 0


def _closest_prefix(sizes_in_order: torch.Tensor, budget: int) -> int:
    """How many of the tiles (in this order) to take: the prefix whose entry count is
    closest to ``budget`` (ties: fewer; at least one when the budget is positive)."""
    if budget <= 0 or sizes_in_order.numel() == 0:
        return 0
    cum = torch.cat([sizes_in_order.new_zeros(1), sizes_in_order.cumsum(0)])
    best = int(torch.argmin((cum - budget).abs()))  # argmin returns the first minimum
    return max(best, 1)


def select_tiles(tile_scores: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], t: int,
                 budget: int, selection: str = "global") -> dict[str, torch.Tensor]:
    """Sorted int32 entry positions of the best tiles per layer (see the module's budget
    rule). ``tile_scores``: pooled scores per layer (``pool_scores``). Ties go to the
    earlier layer, then the lower tile id."""
    names = list(tile_scores)
    if selection == "per-layer":
        from .select import allocate_per_layer

        shares = allocate_per_layer({n: shapes[n][0] * shapes[n][1] for n in names}, budget)
        return {n: select_tiles({n: tile_scores[n]}, shapes, t, shares[n], "global")[n] for n in names}
    from .config import ConfigError

    if selection != "global":
        raise ConfigError(f"unknown selection {selection!r}")
    total = sum(shapes[n][0] * shapes[n][1] for n in names)
    if budget > total:
        raise ConfigError(f"the budget of {budget:,} entries exceeds the {total:,} candidates")
    device = tile_scores[names[0]].device if names else None
    scores = torch.cat([tile_scores[n].float().reshape(-1).nan_to_num(nan=float("-inf")) for n in names])
    sizes = torch.cat([tile_sizes(shapes[n], t, device) for n in names])
    layer_of = torch.cat([torch.full((tile_scores[n].numel(),), i, dtype=torch.int64, device=device)
                          for i, n in enumerate(names)])
    order = torch.sort(scores, descending=True, stable=True).indices  # stable: layer order, then tile id
    take = order[:_closest_prefix(sizes[order], budget)]
    starts = torch.cumsum(torch.tensor([0] + [tile_scores[n].numel() for n in names], device=device), 0)
    chosen = {}
    for i, n in enumerate(names):
        mine = take[layer_of[take] == i] - starts[i]
        chosen[n] = expand_tiles(mine, shapes[n], t)
    return chosen


def top_tiles(tile_scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Row-major tile ids (int64, sorted) of the ``k`` best tiles over all layers (ties: the
    earlier layer, then the lower id); for methods that move a count of whole tiles."""
    names = list(tile_scores)
    scores = torch.cat([tile_scores[n].float().reshape(-1).nan_to_num(nan=float("-inf")) for n in names])
    k = min(k, scores.numel())
    take = torch.sort(scores, descending=True, stable=True).indices[:k]
    out, start = {}, 0
    for n in names:
        size = tile_scores[n].numel()
        mine = take[(take >= start) & (take < start + size)] - start
        out[n] = torch.sort(mine).values
        start += size
    return out


def select_entries(scores: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], budget: int,
                   selection: str, granularity: str, consume: bool = False) -> dict[str, torch.Tensor]:
    """Index sets from per-entry scores at the given granularity: ``select_topk`` for
    ``entry``, else tiles pooled from the scores (``select_tiles``)."""
    t = tile_side(granularity)
    if t == 1:
        from .select import select_topk

        return select_topk(scores, budget, selection, consume=consume)
    pooled = {n: pool_scores(s, shapes[n], t) for n, s in scores.items()}
    return select_tiles(pooled, shapes, t, budget, selection)


def select_streamed(per_layer: Iterable[tuple[str, torch.Tensor]], shapes: Mapping[str, tuple[int, int]],
                    budget: int, selection: str, granularity: str) -> dict[str, torch.Tensor]:
    """``select_entries`` over (name, scores) pairs that arrive one layer at a time, in the
    order of ``shapes``, holding one layer's scores at a time (plus the running top-k, or
    the tiles' pooled scores, 1/t² of the entries): the same index sets."""
    t = tile_side(granularity)
    if t > 1:
        return select_tiles({n: pool_scores(s, shapes[n], t) for n, s in per_layer}, shapes, t, budget, selection)
    from .select import StreamingTopK

    top = StreamingTopK({n: rows * cols for n, (rows, cols) in shapes.items()}, budget, selection)
    for name, scores in per_layer:
        top.add(name, scores)
    return top.result()


def is_tiled(indices: torch.Tensor, shape: tuple[int, int], t: int) -> bool:
    """Whether ``indices`` (sorted, unique) is exactly the entries of whole, aligned t x t
    tiles of a weight whose sides are multiples of t."""
    rows, cols = shape
    n = indices.numel()
    if n == 0 or rows % t or cols % t or n % (t * t):
        return False
    ids = tile_of_entries(indices, shape, t)
    counts = torch.bincount(ids, minlength=(rows // t) * (cols // t))
    return bool(((counts == 0) | (counts == t * t)).all())
