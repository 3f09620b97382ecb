"""Rank consistency under torch.distributed (DDP/FSDP launched by torchrun or accelerate).

``values`` are ordinary parameters, so DDP all-reduces their gradients. What DDP does
not do is keep index *choices* identical: scores computed from a rank's own batches
differ between ranks. Methods therefore all-reduce their score buffers before a top-k,
and ``broadcast_index_sets`` can make rank 0's choice everyone's. With no process group
every function here is a no-op, so single-process code pays nothing.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_mean_(tensors: Mapping[str, torch.Tensor]) -> None:
    """Average score (or gradient) buffers over ranks, in place, in a fixed key order."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for key in sorted(tensors):
        dist.all_reduce(tensors[key], op=dist.ReduceOp.SUM)
        tensors[key].div_(world)


def broadcast_index_sets(index_sets: dict[str, torch.Tensor], src: int = 0) -> dict[str, torch.Tensor]:
    """Every rank gets rank ``src``'s index sets (lengths first, then the indices)."""
    if not is_distributed():
        return index_sets
    out = {}
    for key in sorted(index_sets):
        idx = index_sets[key]
        length = torch.tensor([idx.numel()], dtype=torch.int64, device=idx.device)
        dist.broadcast(length, src)
        buf = idx.to(torch.int32) if dist.get_rank() == src else torch.empty(int(length), dtype=torch.int32, device=idx.device)
        dist.broadcast(buf, src)
        out[key] = buf
    return out


def index_sets_agree(model: Any) -> bool:
    """True when every rank holds exactly the same index sets (a cheap checksum per layer)."""
    if not is_distributed():
        return True
    ok = torch.ones(1)
    for name, layer in sorted(model.sparse_layers().items()):
        idx = layer.indices.to(torch.int64)
        mine = torch.stack([torch.tensor(idx.numel()), idx.sum(), (idx * (torch.arange(idx.numel()) % 7 + 1)).sum()]).double()
        theirs = mine.clone()
        dist.broadcast(theirs, 0)
        if not torch.equal(mine, theirs):
            ok.zero_()
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() == 1)
