"""Tile masks' building blocks: pooling, the budget rule, tile detection and the block-sparse
values' gradient (compiled kernel and torch) against the dense weight gradient."""
from __future__ import annotations

import pytest
import torch

from sparseft import native
from sparseft.blocksparse import TileLayout, tile_sddmm
from sparseft.tiles import (expand_tiles, is_tiled, pool_scores, select_entries, select_tiles, tile_count,
                            tile_sizes)


def test_pool_scores_is_the_tile_mean_including_partial_edge_tiles():
    rows, cols, t = 37, 20, 16
    s = torch.randn(rows * cols)
    pooled = pool_scores(s, (rows, cols), t)
    ref = []
    m = s.view(rows, cols)
    for a in range(0, rows, t):
        for b in range(0, cols, t):
            ref.append(m[a:a + t, b:b + t].mean())
    assert torch.allclose(pooled, torch.stack(ref), atol=1e-6)
    assert tile_sizes((rows, cols), t).tolist() == [256, 64, 256, 64, 80, 20]
    assert pool_scores(torch.tensor([float("nan")] * 4), (2, 2), 16).item() == float("-inf")


def test_expand_tiles_lists_every_entry_of_the_tiles_sorted():
    rows, cols, t = 40, 48, 16
    idx = expand_tiles(torch.tensor([0, 4, 8]), (rows, cols), t)  # grid 3 x 3; tile 8 is the corner (8 x 16)
    dense = torch.zeros(rows, cols, dtype=torch.bool)
    dense[0:16, 0:16] = True
    dense[16:32, 16:32] = True
    dense[32:40, 32:48] = True
    assert torch.equal(idx, torch.nonzero(dense.reshape(-1)).flatten().to(torch.int32))


@pytest.mark.parametrize("budget, tiles", [(256, 1), (300, 1), (384, 1), (385, 2), (900, 4), (1, 1)])
def test_budget_rounds_to_the_nearest_whole_tile(budget, tiles):
    shapes = {"a": (64, 64), "b": (32, 64)}
    scores = {n: torch.rand(r * c, generator=torch.Generator().manual_seed(i)) for i, (n, (r, c)) in enumerate(shapes.items())}
    chosen = select_entries(scores, shapes, budget, "global", "tile16")
    assert sum(v.numel() for v in chosen.values()) == tiles * 256 == tile_count(budget, 16) * 256
    assert all(is_tiled(v, shapes[n], 16) for n, v in chosen.items() if v.numel())


def test_global_tile_selection_takes_the_best_mean_tiles_over_layers():
    shapes = {"a": (32, 32), "b": (32, 32)}
    a = torch.zeros(32, 32)
    a[16:, :16] = 5.0  # tile 2 of a
    b = torch.zeros(32, 32)
    b[:16, 16:] = 3.0  # tile 1 of b
    b[0, 0] = 100.0  # one huge entry: tile 0 of b has mean 100/256 < 3
    chosen = select_tiles({n: pool_scores(s.reshape(-1), shapes[n], 16) for n, s in (("a", a), ("b", b))},
                          shapes, 16, 512, "global")
    assert torch.equal(chosen["a"], expand_tiles(torch.tensor([2]), (32, 32), 16))
    assert torch.equal(chosen["b"], expand_tiles(torch.tensor([1]), (32, 32), 16))


@pytest.mark.parametrize("t", [16, 32])
@pytest.mark.parametrize("shape", [(64, 96), (96, 32)])
def test_tile_sddmm_matches_the_dense_weight_gradient(t, shape):
    rows, cols = shape
    gen = torch.Generator().manual_seed(1)
    g, x = torch.randn(45, rows, generator=gen), torch.randn(45, cols, generator=gen)
    idx = select_entries({"w": torch.rand(rows * cols, generator=gen)}, {"w": shape}, rows * cols // 3, "global",
                         f"tile{t}")["w"]
    tiles = TileLayout.detect(idx, shape)
    assert tiles is not None and tiles.t == t
    ref = (g.double().t() @ x.double()).reshape(-1)[idx.long()]
    out = tile_sddmm(g, x, tiles)  # compiled kernel where built, else torch's bmm
    assert torch.allclose(out.double(), ref, atol=1e-4, rtol=1e-5)
    out64 = tile_sddmm(g.double(), x.double(), tiles)  # float64: torch's bmm
    assert torch.allclose(out64, ref, atol=1e-10)


def test_tile_sddmm_kernel_and_torch_agree():
    if not native.available():
        pytest.skip("the compiled kernel is not built here")
    gen = torch.Generator().manual_seed(2)
    g, x = torch.randn(300, 64, generator=gen), torch.randn(300, 128, generator=gen)
    idx = select_entries({"w": torch.rand(64 * 128, generator=gen)}, {"w": (64, 128)}, 2048, "global", "tile16")["w"]
    tiles = TileLayout.detect(idx, (64, 128))
    blocks = native.tile_sddmm(g, x, tiles.rows, tiles.cols, tiles.t, native.library())
    torch_out = torch.bmm(g.view(300, -1, 16)[:, tiles.rows].permute(1, 2, 0), x.view(300, -1, 16)[:, tiles.cols].transpose(0, 1))
    assert torch.allclose(blocks, torch_out, atol=1e-4)
    with pytest.raises(ValueError, match="outside"):
        native.tile_sddmm(g, x, tiles.rows + 10, tiles.cols, 16, native.library())


def test_detect_refuses_indexes_that_are_not_whole_tiles():
    idx = expand_tiles(torch.tensor([0, 3]), (32, 64), 16)
    assert TileLayout.detect(idx, (32, 64)).t == 16
    assert TileLayout.detect(idx[1:], (32, 64)) is None  # one entry missing
    assert TileLayout.detect(expand_tiles(torch.tensor([0]), (32, 64), 32), (32, 64)).t == 32
    assert TileLayout.detect(expand_tiles(torch.tensor([0]), (40, 40), 16), (40, 40)) is None  # sides not multiples


@pytest.mark.parametrize("t", [16, 32])
@pytest.mark.parametrize("tokens", [1, 127, 128, 129, 300])
@pytest.mark.parametrize("threads", [1, 3])
def test_tile_sddmm_kernel_over_token_chunks_threads_and_strided_factors(t, tokens, threads):
    """The compiled kernel walks tokens in chunks and shares tiles out over threads (more
    threads than tiles included); factors may be row-strided views (ld > features)."""
    if not native.available():
        pytest.skip("the compiled kernel is not built here")
    gen = torch.Generator().manual_seed(3)
    rows, cols = 64, 96
    g = torch.randn(tokens, rows + 32, generator=gen)[:, 16:16 + rows]  # stride(0) = rows + 32
    x = torch.randn(tokens, cols, generator=gen)
    tile_ids = torch.tensor([0, 1, 5]) if t == 16 else torch.tensor([1, 4])
    idx = expand_tiles(tile_ids, (rows, cols), t)
    tiles = TileLayout.detect(idx, (rows, cols))
    assert tiles.t == t
    ref = (g.double().t() @ x.double()).reshape(-1)[idx.long()]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = tile_sddmm(g, x, tiles)
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(out.double(), ref, atol=1e-4, rtol=1e-5)
