"""GraSP scores, w * (H g): the Hessian-gradient product by forward-over-reverse (block by
block where the model has repeated blocks) or by double backward, and selection from them
in groups of layers through a streaming top-k."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..delta import SparseDeltaLayer
from ..distributed import all_reduce_mean_
from ..select import StreamingTopK, select_topk
from .calibration import (Batch, LossFn, _loss, _model_device, _to_device, _weight, batch_size, calibration_batches,
                          functional_loss, mean_gradient, micro_batches, resolve_micro_batch, scoring_mode)


@contextlib.contextmanager
def dense_weights(model: nn.Module, layers: Mapping[str, SparseDeltaLayer]) -> Iterator[list[torch.Tensor]]:
    """The targeted weights as autograd leaves (deltas merged in), restored after."""
    merged = [layer for layer in layers.values() if not layer.merged]
    for layer in merged:
        layer.merge()  # forward then runs the plain base layer on W + S
    weights = [layer.weight for layer in layers.values()]
    try:
        for w in weights:
            w.requires_grad_(True)
        yield weights
    finally:
        for w in weights:
            w.requires_grad_(False)
            w.grad = None
        for layer in merged:
            layer.unmerge()


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


# H g is computed for groups of consecutive layers, one pass over the calibration data per
# group: a group holds at most GROUP_FRACTION of the targeted entries, or GROUP_MIN_BYTES of
# float32 H g if that is more (a small model's whole H g is one group, one pass).
GROUP_FRACTION = 0.125
# calibration.micro_batch="auto": grasp's micro-batch holds this fraction of the
# first-order activation budget (calibration.resolve_micro_batch).
SECOND_ORDER_FACTOR = 4
GROUP_MIN_BYTES = 48 * 2**20


def grasp_groups(layers: Mapping[str, SparseDeltaLayer], max_fraction: float = 1.0,
                 min_bytes: int = 0) -> list[list[str]]:
    """Consecutive layers (in order) in groups of at most ``max_fraction`` of all targeted
    entries each, or of ``min_bytes`` of float32 entries if that is more (a larger layer
    gets a group of its own)."""
    total = sum(layer.weight_numel for layer in layers.values())
    cap = max(max_fraction * total, min_bytes / 4)
    groups: list[list[str]] = [[]]
    size = 0
    for name, layer in layers.items():
        n = layer.weight_numel
        if groups[-1] and size + n > cap:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


class _ForwardModeFriendly(TorchFunctionMode):
    """Runs two functions whose aten backward has a broken or missing forward-mode
    derivative as the plain operations they are (equal up to rounding):

    - ``F.silu`` as x * sigmoid(x): aten's silu_backward has no forward-mode derivative;
    - ``F.mse_loss`` as the mean (or sum) of (input - target)^2: the forward-mode
      derivative of aten's mse_loss_backward writes into the zero tangent of a target that
      has none ("ZeroTensors are immutable"), so a model with a squared-error loss failed.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.silu:
            x = args[0] if args else kwargs["input"]
            return x * torch.sigmoid(x)
        if func is torch.nn.functional.mse_loss and _plain_mse(args, kwargs):
            names = ("input", "target", "size_average", "reduce", "reduction")
            bound = {**dict(zip(names, args)), **kwargs}
            squared = (bound["input"] - bound["target"]).square()
            reduction = bound.get("reduction", "mean")
            return squared.mean() if reduction == "mean" else squared.sum() if reduction == "sum" else squared
        return func(*args, **kwargs)


def _plain_mse(args: tuple, kwargs: dict) -> bool:
    """An ``F.mse_loss`` call without the legacy size_average/reduce or a weight."""
    return len(args) <= 2 and all(kwargs.get(k) is None for k in ("size_average", "reduce", "weight")) \
        and kwargs.get("reduction", "mean") in ("mean", "sum", "none")


def _forward_mode_unavailable(err: Exception) -> bool:
    """Whether ``err`` says that forward-mode AD cannot run some operation here: no
    forward-mode derivative (NotImplementedError), or one that writes into an immutable
    zero tangent (a PyTorch bug in some backward formulas; RuntimeError)."""
    return isinstance(err, NotImplementedError) or (
        isinstance(err, RuntimeError) and "ZeroTensors are immutable" in str(err))


class _Accumulator:
    """Per-layer float32 sums of H g contributions, each scaled by the current weight."""

    def __init__(self) -> None:
        self.scale = 1.0
        self.buffers: dict[str, torch.Tensor] = {}

    def add(self, name: str, grad: torch.Tensor | None) -> None:
        if grad is None:
            return  # the direction does not reach this layer's gradient
        grad = grad.detach().float()
        buf = self.buffers.get(name)
        if buf is None:
            self.buffers[name] = grad * self.scale
        else:
            buf.add_(grad, alpha=self.scale)


def _pieces(model: nn.Module, batches: list[Batch], micro_batch: int | None) -> Iterator[tuple[dict[str, Any], float]]:
    """Every micro-batch of every batch with its weight in the example-weighted mean loss."""
    total = sum(batch_size(b) for b in batches)
    for b in batches:
        for piece, weight in micro_batches(model, b, micro_batch):
            yield piece, batch_size(b) / total * weight


def _blocks(model: nn.Module, layers: Mapping[str, SparseDeltaLayer]) -> list[nn.Module] | None:
    """The model's repeated blocks: the children of the ``nn.ModuleList`` that holds the
    most targeted layers (a transformer's decoder/encoder layers); None when there is none."""
    wanted = {id(layer) for layer in layers.values()}
    best, best_count = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            count = sum(id(m) in wanted for m in module.modules())
            if count > best_count:
                best, best_count = list(module), count
    return best


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    """``config.use_cache = False`` for every config in the model: a block run twice (once
    more to rebuild its graph) must not append to a key/value cache twice."""
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "use_cache")}
    saved = {k: c.use_cache for k, c in configs.items()}
    try:
        for c in configs.values():
            c.use_cache = False
        yield
    finally:
        for k, c in configs.items():
            c.use_cache = saved[k]


def _hidden(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _with_hidden(out: Any, hidden: torch.Tensor) -> Any:
    return hidden if isinstance(out, torch.Tensor) else type(out)((hidden, *out[1:]))


def _split(x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(value, tangent) of a dual tensor, as plain tensors that outlive its dual level."""
    import torch.autograd.forward_ad as fwAD

    if x is None:
        return None
    primal, tangent = fwAD.unpack_dual(x)
    return primal.detach(), None if tangent is None else tangent.detach()


def _join(pair: tuple[torch.Tensor, torch.Tensor | None], leaf: bool = False) -> torch.Tensor:
    """The dual tensor of a (value, tangent) pair in the current dual level; with ``leaf``,
    a fresh leaf that requires grad."""
    import torch.autograd.forward_ad as fwAD

    primal, tangent = pair
    x = primal.detach() if tangent is None else fwAD.make_dual(primal.detach(), tangent)
    return x.requires_grad_(True) if leaf else x


def _has_tangent(x: Any) -> bool:
    import torch.autograd.forward_ad as fwAD

    if isinstance(x, torch.Tensor):
        return fwAD.unpack_dual(x).tangent is not None
    if isinstance(x, (tuple, list)):
        return any(_has_tangent(v) for v in x)
    if isinstance(x, Mapping):
        return any(_has_tangent(v) for v in x.values())
    return False


def _backward_through(out: torch.Tensor, grad: torch.Tensor | None, leaf: torch.Tensor,
                      targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Backward from ``out`` (seeded with ``grad``) into ``targets`` and ``leaf``; returns
    the leaf's gradient as (value, tangent), taken as autograd hands it over (its .grad
    would drop the tangent)."""
    got: list[torch.Tensor] = []
    handle = leaf.register_hook(got.append)
    try:
        torch.autograd.backward(out, grad, inputs=targets + [leaf])
    finally:
        handle.remove()
    return _split(got[0]) if got else None


def _hidden_arg(args: tuple, kwargs: dict) -> Any:
    """The hidden states a block was called with (first positional argument, or
    ``hidden_states=``)."""
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden_arg(args: tuple, kwargs: dict, hidden: Any) -> tuple[tuple, dict]:
    return ((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden})


class _Unsupported(Exception):
    """The model's blocks do not fit the block-by-block second-order pass."""


class _Stop(Exception):
    """Raised by the first block to end a forward pass there."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


@contextlib.contextmanager
def _patched_forward(module: nn.Module, forward: Callable) -> Iterator[None]:
    old = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if old is None:
            del module.forward
        else:
            module.forward = old


def _second_order_pass(model: nn.Module, blocks: list[nn.Module], batch: Batch, duals: Callable,
                       lowest: int, plain_head: bool, loss_fn: LossFn | str | None = None) -> None:
    """Forward with tangents, then backward into the group's weights, one block at a time.

    ``duals(module)``, called inside a dual level, gives the module's targeted weights as
    dual tensors and the group's among them (``_hg_forward_over_reverse``). The forward
    pass runs every block without autograd (tangents still flow) and keeps only each
    block's arguments (the hidden states as value and tangent); the loss's backward
    reaches the last block's output; then each block, from the last down to ``lowest``,
    runs again with autograd from its kept input and is back-propagated. ``lowest`` = -1:
    the group also has layers outside the blocks, and the part before the first block
    (run again up to there) is back-propagated last. Each step has a dual level of its
    own: while autograd records, a level keeps the tangents made in it (they and the
    graph refer to each other) until it exits. So one block's activations and tangents
    (or the head's) are alive at a time instead of the whole model's.

    ``plain_head`` (no targeted layer after the last block): the head (final norm, output
    layer, loss) runs without tangents, and the tangent of the loss gradient at its input
    h, d/dt grad_h L(h + t h'), comes by double backward, as grad_h (grad_h L . h'): for a
    language model's vocabulary-sized logits this holds fewer of them than the dual pass.
    """
    import torch.autograd.forward_ad as fwAD

    calls: list[tuple[tuple, dict]] = []
    top: list[torch.Tensor] = []
    last = len(blocks) - 1
    blocks_forward = [block.forward for block in blocks]

    def run(i: int) -> Callable:
        def forward(*args, **kwargs):
            hidden = _hidden_arg(args, kwargs)
            if _has_tangent(_with_hidden_arg(args, kwargs, None)):
                raise _Unsupported("a block argument other than the hidden states carries a tangent")
            calls.append(_with_hidden_arg(args, kwargs, _split(hidden)))
            with torch.no_grad():
                out = blocks_forward[i](*args, **kwargs)
            if i < last:
                return out
            value, tangent = _split(_hidden(out))
            top.extend([_join((value, None if plain_head else tangent), leaf=True), tangent])
            return _with_hidden(out, top[0])  # where the head's backward stops
        return forward

    with fwAD.dual_level():
        weights, targets = duals(model)
        with contextlib.ExitStack() as stack:
            for i, block in enumerate(blocks):
                stack.enter_context(_patched_forward(block, run(i)))
            loss = functional_loss(model, weights, batch, loss_fn)
        if len(calls) != len(blocks):
            raise _Unsupported(f"the model ran its {len(blocks)} blocks {len(calls)} times")
        leaf, tangent = top
        if plain_head:
            (value,) = torch.autograd.grad(loss, leaf, create_graph=tangent is not None)
            if tangent is None or value.grad_fn is None:
                grad = (value.detach(), None)
            else:
                grad = (value.detach(), torch.autograd.grad(value, leaf, tangent, materialize_grads=True)[0])
        else:
            grad = _backward_through(loss, None, leaf, targets)
        del loss, weights, targets, leaf, tangent
        top.clear()
    for i in range(last, max(lowest, 0) - 1, -1):
        args, kwargs = calls.pop()
        if grad is None:
            return  # nothing below depends on the loss through here
        with fwAD.dual_level():
            weights, targets = duals(blocks[i])
            leaf = _join(_hidden_arg(args, kwargs), leaf=True)
            args, kwargs = _with_hidden_arg(args, kwargs, leaf)
            out = _hidden(torch.func.functional_call(blocks[i], weights, args, kwargs))
            grad = _backward_through(out, _join(grad), leaf, targets)
            del out, leaf, weights, targets
    if lowest < 0 and grad is not None:
        def stop(*args, **kwargs):
            raise _Stop(_hidden_arg(args, kwargs))

        with fwAD.dual_level():
            weights, targets = duals(model)
            try:
                with _patched_forward(blocks[0], stop):
                    functional_loss(model, weights, batch, loss_fn)
            except _Stop as end:
                if end.hidden.grad_fn is not None:
                    torch.autograd.backward(end.hidden, _join(grad), inputs=targets)
            else:
                raise _Unsupported("the first block did not run")


def _lowest_block(blocks: list[nn.Module] | None, layers: Mapping[str, SparseDeltaLayer], group: list[str]) -> int:
    """The first block holding a layer of the group; -1 if one lies outside every block."""
    if blocks is None:
        return -1
    where = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    return min(where.get(id(layers[n]), -1) for n in group)


def _hg_forward_over_reverse(model: nn.Module, layers: Mapping[str, SparseDeltaLayer], g: Mapping[str, torch.Tensor],
                             group: list[str], batches: list[Batch], micro_batch: int | None, acc: _Accumulator,
                             loss_fn: LossFn | str | None = None) -> None:
    """H g for the group's layers: every targeted weight becomes a dual tensor (primal W,
    tangent g; both shared, not copied), swapped in by ``functional_call``; the forward
    pass carries tangents, and the tangent of the ordinary backward's weight gradient is
    d/dt grad L(W + t g) = H g. Where the model has repeated blocks (``_blocks``) the
    backward goes block by block, each block's graph rebuilt from its input
    (``_second_order_pass``); otherwise (or when the blocks do not fit) one forward and
    one backward of the whole model per micro-batch, in a dual level of its own."""
    import torch.autograd.forward_ad as fwAD

    device = _model_device(model)
    blocks = _blocks(model, layers)
    lowest = _lowest_block(blocks, layers, group)
    plain_head = _lowest_block(blocks, layers, list(layers)) >= 0
    module_names = {id(m): name for name, m in model.named_modules()}
    param_names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    in_group = set(group)
    with dense_weights(model, layers) as weights, _ForwardModeFriendly(), _no_kv_cache(model):
        # Named after merging: a quantized base merges by swapping in a float layer.
        module_names = {id(m): name for name, m in model.named_modules()}
        param_names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        for w in weights:
            w.requires_grad_(False)
        by_param = {param_names[id(w)]: (n, w) for n, w in zip(layers, weights)}

        def duals(module: nn.Module) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
            """The targeted weights inside ``module`` as dual tensors, keyed by parameter
            name relative to it, and the group's among them: those require grad and hand
            the tangent of their gradient, H g, to ``acc``."""
            prefix = module_names[id(module)]
            prefix = prefix + "." if prefix else ""
            overrides, targets = {}, []
            for pname, (n, w) in by_param.items():
                if not pname.startswith(prefix):
                    continue
                d = fwAD.make_dual(w.detach(), g[n].to(w.dtype))
                if n in in_group:
                    d.requires_grad_(True)
                    # A tensor hook sees the dual gradient (accumulating into .grad drops the tangent).
                    d.register_hook(lambda grad, n=n: acc.add(n, fwAD.unpack_dual(grad).tangent))
                    d.register_post_accumulate_grad_hook(_drop_grad)
                    targets.append(d)
                overrides[pname[len(prefix):]] = d
            return overrides, targets

        for k, (piece, acc.scale) in enumerate(_pieces(model, batches, micro_batch)):
            piece = _to_device(piece, device)
            if blocks is not None:
                try:
                    _second_order_pass(model, blocks, piece, duals, lowest, plain_head, loss_fn)
                    continue
                except _Unsupported:
                    if k:
                        raise  # it fails on the first piece if at all
                    acc.buffers.clear()
                    blocks = None
            with fwAD.dual_level():
                overrides, targets = duals(model)
                loss = functional_loss(model, overrides, piece, loss_fn)
                torch.autograd.backward(loss, inputs=targets)
                del loss, overrides, targets


def _hg_double_backward(model: nn.Module, layers: Mapping[str, SparseDeltaLayer], g: Mapping[str, torch.Tensor],
                        group: list[str], batches: list[Batch], micro_batch: int | None, acc: _Accumulator,
                        loss_fn: LossFn | str | None = None) -> None:
    """H g for the group's layers by double backward: every targeted layer computes
    y + e * (x @ g^T) with a scalar leaf e = 0 (the forward pass of L(W + e g)); the first
    backward takes only z = dL/de = g . grad L (create_graph), the second H g = dz/dW.
    Works wherever double backward does; keeps the first backward's graph alive."""
    device = _model_device(model)
    eps = torch.zeros((), dtype=torch.float32, requires_grad=True)

    def make_hook(d: torch.Tensor, transposed: bool):
        def hook(module, args, out):
            x = args[0]
            dx = d.to(x.dtype)
            extra = x.matmul(dx) if transposed else torch.nn.functional.linear(x, dx)
            return out + eps.to(device=out.device, dtype=out.dtype) * extra
        return hook

    with dense_weights(model, layers) as weights:
        by_name = dict(zip(layers, weights))
        for w in weights:
            w.requires_grad_(False)
        targets, handles = [], []
        try:
            for name, layer in layers.items():
                handles.append(layer.base_layer.register_forward_hook(make_hook(g[name], layer.transposed)))
            for n in group:
                w = by_name[n]
                w.requires_grad_(True)
                targets.append(w)
                handles.append(w.register_hook(lambda grad, n=n: acc.add(n, grad)))
                handles.append(w.register_post_accumulate_grad_hook(_drop_grad))
            for piece, acc.scale in _pieces(model, batches, micro_batch):
                loss = _loss(model, _to_device(piece, device), loss_fn)
                (z,) = torch.autograd.grad(loss, eps, create_graph=True)
                del loss
                torch.autograd.backward(z, inputs=targets)
                del z
        finally:
            for h in handles:
                h.remove()


HG_METHODS = ("auto", "forward-over-reverse", "double-backward")


def grasp_stream(layers: Mapping[str, SparseDeltaLayer], model: nn.Module | None = None, data: Any = None,
                 micro_batch: int | None = None, groups: list[list[str]] | None = None,
                 hg_method: str = "auto", loss_fn: LossFn | str | None = None,
                 memory_mb: float = 256.0) -> Iterator[tuple[str, torch.Tensor]]:
    """GraSP scores, w * (H g), yielded layer by layer (in layer order, group by group).

    g (the mean gradient, one float32 buffer per targeted layer) comes first. Then, for
    each group of layers, every calibration micro-batch gives its share of H g for the
    group's weights, added to one buffer per layer as autograd reaches it. H g comes by
    forward-over-reverse (``_hg_forward_over_reverse``: forward-mode tangents along g,
    one ordinary backward) or, where an operation has no forward-mode derivative of its
    backward, by double backward (``_hg_double_backward``, slower); ``auto`` tries the
    first and falls back to the second (with a warning). Memory: g + one group's H g +
    one micro-batch's second-order activations; each group costs one more pass over the
    calibration data.
    """
    if model is None:
        raise ValueError("grasp needs the model")
    if hg_method not in HG_METHODS:
        raise ValueError(f"hg_method={hg_method!r}; choose one of {', '.join(HG_METHODS)}")
    batches = calibration_batches(data, "grasp")
    # The activation count is a first-order pass's; the second-order pass keeps tangents
    # beside the values (a whole-model pass about 4x the activations), hence a quarter.
    micro_batch = resolve_micro_batch(model, batches, micro_batch, memory_mb / SECOND_ORDER_FACTOR, loss_fn)
    names = list(layers)
    groups = groups or [names]
    if [n for grp in groups for n in grp] != names:
        raise ValueError("grasp groups must cover the layers in order")
    g_sum = mean_gradient(model, layers, batches, micro_batch, loss_fn)
    g = {n: g_sum.get(n, layers[n]) for n in names}
    del g_sum
    # The math attention kernel has forward-mode and double-backward derivatives.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    method = "forward-over-reverse" if hg_method == "auto" else hg_method
    for group in groups:
        while True:
            acc = _Accumulator()
            run = _hg_forward_over_reverse if method == "forward-over-reverse" else _hg_double_backward
            try:
                with scoring_mode(model), sdpa_kernel([SDPBackend.MATH]):
                    run(model, layers, g, group, batches, micro_batch, acc, loss_fn)
                break
            except (NotImplementedError, RuntimeError) as err:
                if hg_method != "auto" or method != "forward-over-reverse" or not _forward_mode_unavailable(err):
                    raise
                warnings.warn(f"grasp: forward-mode AD is not available here ({err}); using double backward, "
                              "which keeps more activation memory", RuntimeWarning)
                method = "double-backward"  # and redo this group from scratch
        all_reduce_mean_(acc.buffers)  # under torch.distributed: every rank selects alike
        for n in group:
            h = acc.buffers.pop(n, None)
            if h is None:
                h = torch.zeros(layers[n].weight_shape, dtype=torch.float32, device=layers[n].weight_device)
            yield n, h.mul_(_weight(layers[n])).reshape(-1)
        del acc


def grasp_scores(layers: Mapping[str, SparseDeltaLayer], model: nn.Module | None = None, data: Any = None,
                 micro_batch: int | str | None = None, hg_method: str = "auto", loss_fn: LossFn | str | None = None,
                 memory_mb: float = 256.0, **_: object) -> dict[str, torch.Tensor]:
    """GraSP as in SPEFT: w * (H g), with g the mean gradient and H the Hessian of the
    mean loss (``grasp_stream`` with one group: g and H g of every layer held at once).
    ``grasp_select`` chooses the same index sets with less memory."""
    return dict(grasp_stream(layers, model, data, micro_batch, hg_method=hg_method, loss_fn=loss_fn,
                             memory_mb=memory_mb))


def grasp_select(layers: Mapping[str, SparseDeltaLayer], budget: int, selection: str = "global",
                 model: nn.Module | None = None, data: Any = None, micro_batch: int | None = None,
                 group_fraction: float = GROUP_FRACTION, loss_fn: LossFn | str | None = None,
                 group_min_bytes: int = GROUP_MIN_BYTES, memory_mb: float = 256.0) -> dict[str, torch.Tensor]:
    """The top-``budget`` grasp index sets, the same as ``select_topk(grasp_scores(...))``.

    Layers are scored in groups (``grasp_groups(layers, group_fraction, group_min_bytes)``),
    and each group's scores go straight into a streaming top-k (``StreamingTopK``), so
    only g, one group's H g and the running candidates (8 bytes per entry, at most twice
    the budget) are held. When the budget exceeds an eighth of the targeted entries the
    candidates would outweigh the score buffers: one group, dense scores, plain top-k.
    """
    total = sum(layer.weight_numel for layer in layers.values())
    if budget * 8 > total:
        return select_topk(grasp_scores(layers, model, data, micro_batch, loss_fn=loss_fn, memory_mb=memory_mb),
                           budget, selection, consume=True)
    topk = StreamingTopK({n: layer.weight_numel for n, layer in layers.items()}, budget, selection)
    groups = grasp_groups(layers, group_fraction, group_min_bytes)
    for name, score in grasp_stream(layers, model, data, micro_batch, groups, loss_fn=loss_fn, memory_mb=memory_mb):
        topk.add(name, score)
        del score
    return topk.result()
