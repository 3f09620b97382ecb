"""Calibration for the scorers: batches and micro-batches, the loss, and the mean dense
gradient of the targeted weights, collected by grad observers without setting ``W.grad``."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..delta import SparseDeltaLayer
from ..config import AUTO_MICRO_BATCH, CALLABLE
from ..distributed import all_reduce_mean_, full_tensor, is_main_process

Batch = Mapping[str, Any]


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


LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def _loss(model: nn.Module, batch: Batch, loss_fn: LossFn | str | None = None) -> torch.Tensor:
    """``loss_fn(model, batch)``, or the loss the model's forward returns (``model(**batch).loss``).

    A loss function must return the mean loss over the batch's examples (micro-batches
    are weighted by their share of the examples, ``micro_batches``).
    """
    if loss_fn is None:
        return _loss_of(model(**batch))
    if loss_fn == CALLABLE:
        raise ValueError("calibration.loss_fn was a callable, which a saved config does not hold: "
                         "pass the loss function again (SparseConfig.calibration.loss_fn)")
    return loss_fn(model, batch)


def _loss_of(out: Any) -> torch.Tensor:
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("calibration batches must carry labels, so that the model returns a loss "
                         "(or give SparseConfig.calibration.loss_fn(model, batch) -> loss)")
    return loss


class _LossOf(nn.Module):
    """``_loss`` as a module around ``model``, for ``torch.func.functional_call``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | str | None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, **batch: Any) -> torch.Tensor:
        return _loss(self.model, batch, self.loss_fn)


def functional_loss(model: nn.Module, params: Mapping[str, torch.Tensor], batch: Batch,
                    loss_fn: LossFn | str | None = None) -> torch.Tensor:
    """``_loss`` with ``params`` (names relative to ``model``) in place of the model's own."""
    swapped = {f"model.{name}": p for name, p in params.items()}
    return torch.func.functional_call(_LossOf(model, loss_fn), swapped, (), dict(batch))


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


def _example_size(batch: Batch) -> int:
    """Elements per example across the batch's tensors (its padded length, in effect)."""
    n = batch_size(batch)
    return sum(v.numel() // n for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n)


def saved_activation_bytes(model: nn.Module, batch: Batch, loss_fn: LossFn | str | None = None) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one forward pass over
    ``batch`` (each storage counted once; the model's own parameters and buffers, which
    are kept anyway, not counted): the activation memory its backward pass needs."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no plain storage (e.g. a sparse tensor)
            seen[id(t)] = t.numel() * t.element_size()
            return t
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with scoring_mode(model), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, _to_device(batch, _model_device(model)), loss_fn)
    del loss
    return sum(seen.values())


def resolve_micro_batch(model: nn.Module, batches: list[Batch], micro_batch: int | str | None,
                        memory_mb: float = 256.0, loss_fn: LossFn | str | None = None) -> int | None:
    """``micro_batch`` itself, or for ``"auto"`` the most examples whose activations fit in
    ``memory_mb``: one example of the longest calibration batch (by padded size) runs
    forward, ``saved_activation_bytes`` measures it, and the budget divided by that, at
    least 1, at most the largest batch, is the micro-batch. Activations grow linearly with
    the examples of a micro-batch, so each micro-batch's backward keeps at most about
    ``memory_mb`` (the longest batch's examples are the largest)."""
    if micro_batch != AUTO_MICRO_BATCH:
        return micro_batch
    largest = max(batch_size(b) for b in batches)
    if largest == 1:
        return 1
    probe = next(split_examples(max(batches, key=_example_size)))
    per_example = max(1, saved_activation_bytes(model, probe, loss_fn))
    return max(1, min(largest, int(memory_mb * 2**20 // per_example)))


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
            buf = torch.zeros(layer.weight_shape, dtype=torch.float32, device=layer.weight_device)
        return buf


def _backward_to_values(loss: torch.Tensor, layers: Mapping[str, SparseDeltaLayer]) -> None:
    """Run the backward pass only as far as the sparse layers need (no head/bias grads)."""
    torch.autograd.backward(loss, inputs=[layer.values for layer in layers.values()])


def mean_gradient(model: nn.Module, layers: Mapping[str, SparseDeltaLayer], batches: list[Batch],
                  micro_batch: int | str | None = None, loss_fn: LossFn | str | None = None,
                  memory_mb: float = 256.0) -> GradientSum:
    """g = sum_b (n_b / N) grad L_b: the example-weighted mean gradient of the loss.

    With ``micro_batch``, each batch runs in pieces of at most that many examples,
    weighted so that their sum is the batch's gradient (``micro_batches``): the same g,
    with the activations of one piece alive at a time. ``"auto"``: as many examples as
    fit in ``memory_mb`` of activations (``resolve_micro_batch``).
    """
    micro_batch = resolve_micro_batch(model, batches, micro_batch, memory_mb, loss_fn)
    acc = GradientSum()
    total = sum(batch_size(b) for b in batches)
    device = _model_device(model)
    # A progress bar over the calibration batches (main process only; TQDM_DISABLE=1 hides it).
    progress = tqdm(batches, desc="calibration", unit="batch", leave=False, dynamic_ncols=True,
                    disable=len(batches) < 2 or not is_main_process())
    with scoring_mode(model), observing(layers, acc.observer):
        for b in progress:
            for piece, weight in micro_batches(model, b, micro_batch):
                acc.scale = batch_size(b) / total * weight
                _backward_to_values(_loss(model, _to_device(piece, device), loss_fn), layers)
    all_reduce_mean_(acc.buffers)  # under torch.distributed: every rank scores (and selects) alike
    return acc


def _weight(layer: SparseDeltaLayer) -> torch.Tensor:
    """The frozen weight, whole: an FSDP2-sharded one is gathered (a collective; under
    FSDP2 every rank scores at the same step, so every rank gets here)."""
    return full_tensor(layer.weight.detach())
