"""Salience scores: one flat float32 tensor per targeted weight, higher = keep.

Scorers (DESIGN.md section 5; g is the mean gradient of the loss over the calibration
examples, w the frozen weight):

=========  ==========================================================================
random     U(0, 1), seeded per layer name
magnitude  |w| (or -|w|: smallest first, as PaFi)
gradient   |g|
snip       |w * g|
taylor     (w * g)^2
d3         |g| / (|w| + eps)^e  (ID3; e = 0 makes it |g|)
fisher     mean over examples of the per-example squared gradient (micro-batches of one)
grasp      w * (H g)  (Hessian-gradient product, forward-over-reverse; raw value, as SPEFT)
synflow    |w * dR/dw|, R = sum of the logits with every parameter made positive, on an
           all-ones ``inputs_embeds`` of one token (weights restored exactly afterwards)
=========  ==========================================================================

Memory: the gradient-based scorers never set ``W.grad``. Each targeted layer's dense
gradient is handed to a ``grad_observer`` during the ordinary backward pass (one
weight-sized temporary at a time) and summed into one float32 buffer per layer, which is
then turned into the score in place. Calibration batches run in micro-batches
(``micro_batch`` examples, weighted by their share of the batch's loss items), so only
one micro-batch's activations are alive at a time. grasp holds g and, per group of
layers, H g; the groups' scores go straight into a streaming top-k (``grasp_select``).
"""
from __future__ import annotations

import contextlib
import warnings
import zlib
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .delta import SparseDeltaLayer
from .distributed import all_reduce_mean_, full_tensor

ScoreFn = Callable[..., dict[str, torch.Tensor]]
Batch = Mapping[str, Any]


# ----------------------------------------------------------------------------- helpers
def _layer_generator(seed: int, name: str) -> torch.Generator:
    # A per-layer stream keyed by the module name: the same layer gets the same
    # scores whatever else is targeted, and on every process.
    gen = torch.Generator()
    gen.manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63))
    return gen


def batch_size(batch: Batch) -> int:
    """Number of examples in a batch (the leading dimension of its tensors)."""
    for key in ("input_ids", "inputs_embeds", "labels"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim():
            return int(value.shape[0])
    raise ValueError("cannot tell the batch size: the batch holds no tensors")


def split_examples(batch: Batch) -> Iterator[dict[str, Any]]:
    """The examples of a batch, one at a time, each as a batch of one."""
    n = batch_size(batch)
    for i in range(n):
        yield {k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
               for k, v in batch.items()}


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def calibration_batches(data: Iterable[Batch] | None, method: str) -> list[Batch]:
    if data is None:
        raise ValueError(f"method {method!r} scores from calibration data: pass calibration_data "
                         "(batches with labels) to get_sparse_model")
    batches = list(data)
    if not batches:
        raise ValueError(f"method {method!r} got empty calibration data")
    return batches


def _loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return _loss_of(model(**batch))


def _loss_of(out: Any) -> torch.Tensor:
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("calibration batches must carry labels, so that the model returns a loss")
    return loss


def _is_causal_lm(model: nn.Module) -> bool:
    """Whether the model's loss shifts the labels by one (Hugging Face causal LM heads)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(inner).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def loss_items(model: nn.Module, batch: Batch) -> int:
    """How many items the model's (mean-reduced) loss averages over for this batch.

    Per-example labels (1-D, or float targets): the examples. Token labels (integer, 2-D
    or more): the tokens whose label is not -100, after the one-token shift of causal LM
    heads. This is what the Hugging Face losses divide by.
    """
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2 or labels.is_floating_point():
        return batch_size(batch)
    keep = labels != -100
    if _is_causal_lm(model):
        keep = keep[..., 1:]
    return int(keep.sum())


def micro_batches(model: nn.Module, batch: Batch, size: int | None) -> Iterator[tuple[dict[str, Any], float]]:
    """(micro-batch, weight) pairs with sum_m weight_m * L_m = L_batch.

    Each piece holds at most ``size`` examples (None: the batch as given, weight 1).
    The batch loss being a mean over its items (``loss_items``), a piece's weight is its
    share of the items; pieces with no items (whose mean loss is NaN) are skipped.
    """
    n = batch_size(batch)
    if size is None or size >= n:
        yield dict(batch), 1.0
        return
    pieces = [{k: v[i:i + size] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
               for k, v in batch.items()} for i in range(0, n, size)]
    counts = [loss_items(model, piece) for piece in pieces]
    total = sum(counts)
    for piece, count in zip(pieces, counts):
        if count:
            yield piece, count / total


@contextlib.contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and untouched ``.grad`` of every parameter, restored after."""
    was_training = model.training
    params = list(model.parameters())
    saved = [p.grad for p in params]
    model.eval()
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        model.train(was_training)


@contextlib.contextmanager
def observing(layers: Mapping[str, SparseDeltaLayer], make_observer: Callable[[str], Callable]) -> Iterator[None]:
    """Arm every layer's ``grad_observer`` for the duration of the block."""
    try:
        for name, layer in layers.items():
            layer.grad_observer = make_observer(name)
        yield
    finally:
        for layer in layers.values():
            layer.grad_observer = None


class GradientSum:
    """Per-layer float32 sums of the dense weight gradients a backward pass reports.

    ``scale`` multiplies what is added (set it per batch); ``square`` adds g*g instead
    (for fisher). Buffers are created on first use and owned here.
    """

    def __init__(self, square: bool = False):
        self.square = square
        self.scale = 1.0
        self.buffers: dict[str, torch.Tensor] = {}

    def observer(self, name: str) -> Callable[[torch.Tensor], None]:
        def observe(grad: torch.Tensor) -> None:
            grad = grad.detach()
            buf = self.buffers.get(name)
            if self.square:
                g = grad.float()
                if buf is None:
                    # As below: the fresh gradient itself becomes the buffer (no zeros first).
                    self.buffers[name] = g.square_().mul_(self.scale)
                else:
                    buf.addcmul_(g, g, value=self.scale)
            elif buf is None:
                # The layer's backward hands over a fresh matmul output that nobody else
                # holds: it becomes the buffer (no copy).
                g = grad.float()
                self.buffers[name] = g.mul_(self.scale) if self.scale != 1.0 else g
            else:
                buf.add_(grad.float(), alpha=self.scale)
        return observe

    def arm(self, layers: Mapping[str, SparseDeltaLayer]) -> None:
        """Route every layer's dense gradient into this sum (idempotent)."""
        for name, layer in layers.items():
            layer.grad_observer = self.observer(name)

    @staticmethod
    def disarm(layers: Mapping[str, SparseDeltaLayer]) -> None:
        for layer in layers.values():
            layer.grad_observer = None

    def pop(self) -> dict[str, torch.Tensor]:
        """The sums, averaged over ranks under torch.distributed (so every rank makes the
        same index choice), leaving this sum empty."""
        buffers, self.buffers = self.buffers, {}
        all_reduce_mean_(buffers)
        return buffers

    def get(self, name: str, layer: SparseDeltaLayer) -> torch.Tensor:
        """The sum for ``name`` (zeros when the layer got no gradient)."""
        buf = self.buffers.pop(name, None)
        if buf is None:
            buf = torch.zeros(layer.weight.shape, dtype=torch.float32, device=layer.weight.device)
        return buf


def _backward_to_values(loss: torch.Tensor, layers: Mapping[str, SparseDeltaLayer]) -> None:
    """Run the backward pass only as far as the sparse layers need (no head/bias grads)."""
    torch.autograd.backward(loss, inputs=[layer.values for layer in layers.values()])


def mean_gradient(model: nn.Module, layers: Mapping[str, SparseDeltaLayer], batches: list[Batch],
                  micro_batch: int | None = None) -> GradientSum:
    """g = sum_b (n_b / N) grad L_b: the example-weighted mean gradient of the loss.

    With ``micro_batch``, each batch runs in pieces of at most that many examples,
    weighted so that their sum is the batch's gradient (``micro_batches``): the same g,
    with the activations of one piece alive at a time.
    """
    acc = GradientSum()
    total = sum(batch_size(b) for b in batches)
    device = _model_device(model)
    with scoring_mode(model), observing(layers, acc.observer):
        for b in batches:
            for piece, weight in micro_batches(model, b, micro_batch):
                acc.scale = batch_size(b) / total * weight
                _backward_to_values(_loss(model, _to_device(piece, device)), layers)
    all_reduce_mean_(acc.buffers)  # under torch.distributed: every rank scores (and selects) alike
    return acc


def _weight(layer: SparseDeltaLayer) -> torch.Tensor:
    """The frozen weight, whole: an FSDP2-sharded one is gathered (a collective; under
    FSDP2 every rank scores at the same step, so every rank gets here)."""
    return full_tensor(layer.weight.detach())


# ----------------------------------------------------------------------------- scorers
def random_scores(layers: Mapping[str, SparseDeltaLayer], seed: int = 0, **_: object) -> dict[str, torch.Tensor]:
    """U(0, 1) per entry, seeded: the top-k is a uniform random subset."""
    return {
        name: torch.rand(layer.weight.numel(), generator=_layer_generator(seed, name)).to(layer.weight.device)
        for name, layer in layers.items()
    }


def magnitude_scores(layers: Mapping[str, SparseDeltaLayer], order: str = "largest", **_: object) -> dict[str, torch.Tensor]:
    """|w|, or -|w| to prefer the smallest weights (PaFi)."""
    scores = {}
    for name, layer in layers.items():
        s = _weight(layer).float().abs().reshape(-1)  # one fresh buffer per layer
        scores[name] = s if order == "largest" else s.neg_()
    return scores


def scores_from_gradient(method: str, layers: Mapping[str, SparseDeltaLayer], grads: GradientSum,
                         d3_epsilon: float = 1e-3, d3_exponent: float = 0.0) -> dict[str, torch.Tensor]:
    """Turn summed gradients into gradient/snip/taylor/d3 scores, in place, layer by layer."""
    scores = {}
    for name, layer in layers.items():
        g = grads.get(name, layer)
        if method == "gradient":
            g.abs_()
        elif method == "snip":
            g.mul_(_weight(layer)).abs_()
        elif method == "taylor":
            g.mul_(_weight(layer)).square_()
        elif method == "d3":
            g.abs_()
            if d3_exponent != 0.0:
                g.div_(_weight(layer).float().abs().add_(d3_epsilon).pow_(d3_exponent))
        else:
            raise ValueError(f"{method!r} is not a plain gradient scorer")
        scores[name] = g.reshape(-1)
    return scores


def _gradient_scorer(method: str) -> ScoreFn:
    def scorer(layers: Mapping[str, SparseDeltaLayer], model: nn.Module | None = None, data: Any = None,
               d3_epsilon: float = 1e-3, d3_exponent: float = 0.0, micro_batch: int | None = None,
               **_: object) -> dict[str, torch.Tensor]:
        grads = mean_gradient(model, layers, calibration_batches(data, method), micro_batch)
        return scores_from_gradient(method, layers, grads, d3_epsilon, d3_exponent)

    scorer.__name__ = f"{method}_scores"
    scorer.__doc__ = f"The {method} score from the mean gradient over the calibration batches."
    return scorer


gradient_scores = _gradient_scorer("gradient")
snip_scores = _gradient_scorer("snip")
taylor_scores = _gradient_scorer("taylor")
d3_scores = _gradient_scorer("d3")


def fisher_scores(layers: Mapping[str, SparseDeltaLayer], model: nn.Module | None = None, data: Any = None,
                  **_: object) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal: mean over examples of (grad of that example's loss)^2.

    Examples run as micro-batches of one; each layer's per-example gradient is squared
    and added to its buffer as the backward pass reaches it.
    """
    batches = calibration_batches(data, "fisher")
    acc = GradientSum(square=True)
    total = sum(batch_size(b) for b in batches)
    acc.scale = 1.0 / total
    device = _model_device(model)
    with scoring_mode(model), observing(layers, acc.observer):
        for b in batches:
            for example in split_examples(b):
                _backward_to_values(_loss(model, _to_device(example, device)), layers)
    all_reduce_mean_(acc.buffers)
    return {name: acc.get(name, layer).reshape(-1) for name, layer in layers.items()}


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


def grasp_groups(layers: Mapping[str, SparseDeltaLayer], max_fraction: float = 1.0) -> list[list[str]]:
    """Consecutive layers (in order) in groups of at most ``max_fraction`` of all targeted
    entries each (a larger layer gets a group of its own)."""
    total = sum(layer.weight.numel() for layer in layers.values())
    cap = max_fraction * total
    groups: list[list[str]] = [[]]
    size = 0
    for name, layer in layers.items():
        n = layer.weight.numel()
        if groups[-1] and size + n > cap:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


class _DecomposedSiLU(TorchFunctionMode):
    """Runs ``F.silu`` as x * sigmoid(x): aten's silu_backward has no forward-mode
    derivative, sigmoid's backward has (equal up to rounding)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.silu:
            x = args[0] if args else kwargs["input"]
            return x * torch.sigmoid(x)
        return func(*args, **(kwargs or {}))


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
                       lowest: int, plain_head: bool) -> None:
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
            loss = _loss_of(torch.func.functional_call(model, weights, (), batch))
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
                    torch.func.functional_call(model, weights, (), batch)
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
                             group: list[str], batches: list[Batch], micro_batch: int | None, acc: _Accumulator) -> None:
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
    with dense_weights(model, layers) as weights, _DecomposedSiLU(), _no_kv_cache(model):
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
                    _second_order_pass(model, blocks, piece, duals, lowest, plain_head)
                    continue
                except _Unsupported:
                    if k:
                        raise  # it fails on the first piece if at all
                    acc.buffers.clear()
                    blocks = None
            with fwAD.dual_level():
                overrides, targets = duals(model)
                loss = _loss_of(torch.func.functional_call(model, overrides, (), piece))
                torch.autograd.backward(loss, inputs=targets)
                del loss, overrides, targets


def _hg_double_backward(model: nn.Module, layers: Mapping[str, SparseDeltaLayer], g: Mapping[str, torch.Tensor],
                        group: list[str], batches: list[Batch], micro_batch: int | None, acc: _Accumulator) -> None:
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
                loss = _loss(model, _to_device(piece, device))
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
                 hg_method: str = "auto") -> Iterator[tuple[str, torch.Tensor]]:
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
    names = list(layers)
    groups = groups or [names]
    if [n for grp in groups for n in grp] != names:
        raise ValueError("grasp groups must cover the layers in order")
    g_sum = mean_gradient(model, layers, batches, micro_batch)
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
                    run(model, layers, g, group, batches, micro_batch, acc)
                break
            except NotImplementedError as err:
                if hg_method != "auto" or method != "forward-over-reverse":
                    raise
                warnings.warn(f"grasp: forward-mode AD is not available here ({err}); using double backward, "
                              "which keeps more activation memory", RuntimeWarning)
                method = "double-backward"  # and redo this group from scratch
        all_reduce_mean_(acc.buffers)  # under torch.distributed: every rank selects alike
        for n in group:
            h = acc.buffers.pop(n, None)
            if h is None:
                h = torch.zeros(layers[n].weight.shape, dtype=torch.float32, device=layers[n].weight.device)
            yield n, h.mul_(_weight(layers[n])).reshape(-1)
        del acc


def grasp_scores(layers: Mapping[str, SparseDeltaLayer], model: nn.Module | None = None, data: Any = None,
                 micro_batch: int | None = None, hg_method: str = "auto", **_: object) -> dict[str, torch.Tensor]:
    """GraSP as in SPEFT: w * (H g), with g the mean gradient and H the Hessian of the
    mean loss (``grasp_stream`` with one group: g and H g of every layer held at once).
    ``grasp_select`` chooses the same index sets with less memory."""
    return dict(grasp_stream(layers, model, data, micro_batch, hg_method=hg_method))


def grasp_select(layers: Mapping[str, SparseDeltaLayer], budget: int, selection: str = "global",
                 model: nn.Module | None = None, data: Any = None, micro_batch: int | None = None,
                 group_fraction: float = 0.125) -> dict[str, torch.Tensor]:
    """The top-``budget`` grasp index sets, the same as ``select_topk(grasp_scores(...))``.

    Layers are scored in groups of at most ``group_fraction`` of the targeted entries,
    and each group's scores go straight into a streaming top-k (``StreamingTopK``), so
    only g, one group's H g and the running candidates (8 bytes per entry, at most twice
    the budget) are held. When the budget exceeds an eighth of the targeted entries the
    candidates would outweigh the score buffers: one group, dense scores, plain top-k.
    """
    from .select import StreamingTopK, select_topk

    total = sum(layer.weight.numel() for layer in layers.values())
    if budget * 8 > total:
        return select_topk(grasp_scores(layers, model, data, micro_batch), budget, selection, consume=True)
    topk = StreamingTopK({n: layer.weight.numel() for n, layer in layers.items()}, budget, selection)
    for name, score in grasp_stream(layers, model, data, micro_batch, grasp_groups(layers, group_fraction)):
        topk.add(name, score)
        del score
    return topk.result()


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    return logits


def _negate_where(p: torch.Tensor, mask: torch.Tensor, chunk: int = 1 << 20) -> None:
    """p[mask] = -p[mask], exactly and in place, in chunks (boolean indexing of a large
    parameter would build int64 index tensors twice its size)."""
    flat, m = p.view(-1), mask.view(-1)
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk]
        part.copy_(torch.where(m[start:start + chunk], part.neg(), part))


def synflow_scores(layers: Mapping[str, SparseDeltaLayer], model: nn.Module | None = None, **_: object) -> dict[str, torch.Tensor]:
    """SynFlow as in SPEFT: every parameter made positive, one forward pass on an all-ones
    ``inputs_embeds`` of a single token, R = sum of the logits, score |w * dR/dw|.

    Signs are kept as one bool per parameter entry and put back exactly (negation is exact).
    Nonlinearities are kept (SPEFT's patching of ``torch.nn.functional`` does not reach
    the activation modules transformers uses either).
    """
    if model is None:
        raise ValueError("synflow needs the model")
    emb = model.get_input_embeddings()
    hidden = emb.weight.shape[1]
    params = [p for p in model.parameters() if p.is_floating_point()]
    acc = GradientSum()
    with scoring_mode(model):
        with torch.no_grad():
            signs = [torch.signbit(p) for p in params]
            for p in params:
                p.abs_()
        try:
            ones = torch.ones(1, 1, hidden, dtype=emb.weight.dtype, device=emb.weight.device)
            with observing(layers, acc.observer):
                r = _logits(model(inputs_embeds=ones)).float().sum()
                _backward_to_values(r, layers)
        finally:
            with torch.no_grad():
                for p, s in zip(params, signs):
                    _negate_where(p, s)
            del signs
    scores = {}
    for name, layer in layers.items():
        g = acc.get(name, layer)
        scores[name] = g.mul_(_weight(layer)).abs_().reshape(-1)
    return scores


SCORERS: dict[str, ScoreFn] = {
    "random": random_scores,
    "magnitude": magnitude_scores,
    "gradient": gradient_scores,
    "snip": snip_scores,
    "taylor": taylor_scores,
    "fisher": fisher_scores,
    "grasp": grasp_scores,
    "synflow": synflow_scores,
    "d3": d3_scores,
}


def compute_scores(method: str, layers: Mapping[str, SparseDeltaLayer], **kwargs: object) -> dict[str, torch.Tensor]:
    try:
        scorer = SCORERS[method]
    except KeyError:
        raise ValueError(f"no scorer named {method!r}; known: {', '.join(sorted(SCORERS))}") from None
    return scorer(layers, **kwargs)
