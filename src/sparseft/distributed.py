"""Multi-process training (torch.distributed: DDP, FSDP2; launched by torchrun or accelerate).

Design (docs/distributed.md). The methods change index sets during training, and
``SparseDeltaLayer.set_indices`` gives the ``values`` parameter new storage of a new size.
DDP's reducer (and FSDP2's sharding) are built once for fixed parameter sizes, so they
must not manage ``values``:

- ``ignore_sparse_values`` tells DDP to leave every ``values`` parameter alone (torch's
  ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``, which also
  holds for the DDP wrapper that accelerate / ``transformers.Trainer`` build). It must run
  before the wrapper is built; ``SparseController`` (``sparseft.train`` and
  ``SparseCallback``) calls it when it is constructed.
- ``SparseGradSync`` then averages the values' gradients over ranks itself: one
  flattened ``all_reduce`` per backward pass, queued by a post-accumulate-grad hook to
  run when autograd finishes the pass (so before gradient clipping, the optimizer step
  and every method hook that reads gradients, also under ``transformers.Trainer``, which
  clips before any callback). Hooks live on the Parameter objects, which
  ``set_indices`` keeps, so the sync survives every index change and every wrapper.
  With gradient accumulation every micro-batch is synced; the mean is linear, so the
  accumulated gradient is the same as one sync at the end.
- Index choices are made identically on every rank: dense-gradient scores (calibration
  and the training-time observers, ``GradientSum.pop``) are all-reduced before a top-k,
  random scores are seeded by layer name, and the optimizer surgery that follows is
  deterministic given the same index sets. ``broadcast_index_sets`` makes rank 0's
  choice everyone's where a caller prefers that; ``index_sets_agree`` checks.

With no process group (or a world of one) every function here is a no-op, so
single-process code pays nothing.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_mean_(tensors: Mapping[str, torch.Tensor]) -> None:
    """Average score (or gradient) buffers over ranks, in place, in a fixed key order.

    One call per buffer, in place: these are weight-sized, and flattening them together
    would double the peak memory of a selection step.
    """
    if not is_distributed():
        return
    world = dist.get_world_size()
    for key in sorted(tensors):
        dist.all_reduce(tensors[key], op=dist.ReduceOp.SUM)
        tensors[key].div_(world)


def _flat_all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """One SUM all-reduce per dtype over the tensors flattened together, then / world."""
    world = dist.get_world_size()
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group]) if len(group) > 1 else group[0].reshape(-1).clone()
        if flat.numel():
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(world)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def sparse_value_names(module: torch.nn.Module, model: Any) -> list[str]:
    """Qualified names, relative to ``module``, of ``model``'s sparse ``values`` parameters."""
    wanted = {id(p) for p in model.sparse_parameters()}
    return [name for name, p in module.named_parameters(remove_duplicate=False) if id(p) in wanted]


def ignore_sparse_values(model: Any) -> None:
    """Tell DDP not to reduce (or broadcast) the sparse ``values``: ``SparseGradSync`` does it.

    Marks both the SparseModel and its base model, so whichever of the two gets wrapped
    (by hand, by accelerate or by ``transformers.Trainer``) ignores them. Must run before
    the DDP wrapper is built. Names already marked are kept.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if launched_distributed():
        add_ddp_anchor(model)
    for module in (model, model.get_base_model() if hasattr(model, "get_base_model") else None):
        if module is None:
            continue
        names = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ())) | set(sparse_value_names(module, model))
        DDP._set_params_and_buffers_to_ignore_for_model(module, sorted(names))


def launched_distributed() -> bool:
    """A process group exists, or a launcher (torchrun, accelerate launch) started several
    processes (the group may be created later, e.g. by accelerate)."""
    import os

    return is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) > 1


def add_ddp_anchor(model: Any) -> bool:
    """Give DDP a parameter to manage when only sparse values are trained.

    DDP refuses a module with no trainable parameter it manages ("DistributedDataParallel
    is not needed when a module doesn't have any parameter that requires a gradient"), and
    accelerate / ``transformers.Trainer`` wrap every trainable model in DDP. With the values
    ignored, a causal LM trained through its sparse deltas alone has none. The anchor is an
    empty (0-element) trainable parameter on the first sparse layer, added to that layer's
    output as an empty sum (0): it is in every graph, so DDP gets its (empty) gradient each
    step without ``find_unused_parameters``; it is never in sparseft's optimizer, counted,
    or saved in the adapter. Returns whether an anchor was added.
    """
    layers = list(model.sparse_layers().values())
    if not layers or any(getattr(layer, "ddp_anchor", None) is not None for layer in layers):
        return False
    if any(p.requires_grad for p in model.dense_trainable_parameters()):
        return False
    first = layers[0]
    anchor = torch.nn.Parameter(torch.zeros(0, dtype=first.values.dtype, device=first.values.device))
    anchor._sparseft_ddp_anchor = True
    first.ddp_anchor = anchor
    return True


class SparseGradSync:
    """Averages the sparse values' gradients over ranks once per backward pass.

    ``attach()`` registers a post-accumulate-grad hook on every ``values`` parameter; the
    first one that fires in a backward pass queues ``sync`` to run when the pass ends.
    ``sync`` all-reduces (mean) every values gradient in one flattened call per dtype;
    a rank whose layer got no gradient contributes zeros, so every rank sends the same
    sizes (index sets agree across ranks). ``detach()`` removes the hooks.
    """

    def __init__(self, model: Any):
        self.model = model
        self.handles: list[Any] = []
        self._queued = False
        self.syncs = 0  # how many backward passes were synced (for tests and logs)

    def attach(self) -> None:
        self.detach()
        for p in self.model.sparse_parameters():
            self.handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self._queued = False

    def _on_grad(self, _param: torch.Tensor) -> None:
        if self._queued or not is_distributed():
            return
        self._queued = True
        torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._queued = False
        self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        if not is_distributed():
            return
        params = [layer.values for _, layer in sorted(self.model.sparse_layers().items())]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        _flat_all_reduce_mean_([p.grad for p in params])
        self.syncs += 1


def wrap_ddp(model: Any, **ddp_kwargs: Any) -> torch.nn.Module:
    """A DDP wrapper around ``model`` that leaves the sparse values to ``SparseGradSync``.

    Dense trainable parameters (task heads, biases) are reduced by DDP as usual. On CUDA
    the wrapper is bound to the model's device unless ``device_ids`` is given.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignore_sparse_values(model)
    device = next(model.parameters()).device
    if device.type == "cuda" and "device_ids" not in ddp_kwargs:
        ddp_kwargs["device_ids"] = [device.index]
    return DDP(model, **ddp_kwargs)


def fully_shard_sparse(model: Any, block_classes: Iterable[str] | None = None, **fsdp_kwargs: Any) -> Any:
    """Shard ``model``'s base weights with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    Every module whose class name is in ``block_classes`` (default: the base model's
    ``_no_split_modules``, e.g. ``LlamaDecoderLayer``) becomes one FSDP unit, then the
    whole model does (embeddings, heads, what is left). The sparse ``values`` are passed
    as ``ignored_params``: they stay whole on every rank (they are O(k) and change size
    with the index sets) and ``SparseGradSync`` averages their gradients. A sparse layer's
    frozen weight is sharded like any other; FSDP2 gathers it before the unit's forward,
    so the delta is always applied to the unsharded weight, never to a shard. Dense
    trainable parameters (task heads, biases) are sharded and reduced by FSDP2.

    Build the optimizer after this call (FSDP2 replaces the parameters it shards).
    Scorers that read the frozen weights (magnitude, snip, taylor, d3 with an exponent)
    gather each one whole while scoring. Not supported: ``dynamic.drop_policy="merge"`` and
    ``merge()`` (they write into the sharded weights; merge after reloading the adapter
    on an unsharded model). Returns ``model`` (sharded in place).
    """
    from torch.distributed.fsdp import fully_shard

    cfg = getattr(model, "sparse_config", None)
    if cfg is not None and cfg.schedule == "dynamic" and cfg.dynamic.drop_policy == "merge":
        raise ValueError("drop_policy='merge' folds dropped entries into the base weights, which FSDP2 shards: "
                         "use drop_policy='zero' with FSDP2")
    anchors = {layer.ddp_anchor for layer in model.sparse_layers().values() if layer.ddp_anchor is not None}
    ignored = set(fsdp_kwargs.pop("ignored_params", set())) | set(model.sparse_parameters()) | anchors
    if block_classes is None:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        block_classes = getattr(inner, "_no_split_modules", None) or []
    block_classes = set(block_classes)
    blocks = [m for m in model.modules() if type(m).__name__ in block_classes]
    for block in blocks:
        fully_shard(block, ignored_params=ignored, **fsdp_kwargs)
    fully_shard(model, ignored_params=ignored, **fsdp_kwargs)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly FSDP2-sharded) DTensor. A collective for a
    DTensor: every rank must call it."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


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
    sums = []
    for _, layer in sorted(model.sparse_layers().items()):
        idx = layer.indices.detach().to("cpu", torch.int64)
        weights = torch.arange(idx.numel()) % 7 + 1
        sums.append(torch.stack([torch.tensor(idx.numel()), idx.sum(), (idx * weights).sum()]))
    mine = torch.cat(sums).double() if sums else torch.zeros(1, dtype=torch.float64)
    device = _comm_device()
    mine = mine.to(device)
    theirs = mine.clone()
    dist.broadcast(theirs, 0)
    ok = torch.tensor([1.0 if torch.equal(mine, theirs) else 0.0], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() == 1)


def _comm_device() -> torch.device:
    """The device collectives of the default group expect (NCCL: this rank's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


__all__: Iterable[str] = [
    "SparseGradSync", "add_ddp_anchor", "all_reduce_mean_", "barrier", "broadcast_index_sets", "full_tensor",
    "fully_shard_sparse", "ignore_sparse_values", "index_sets_agree", "is_distributed", "is_main_process",
    "launched_distributed", "sparse_value_names", "wrap_ddp",
]
