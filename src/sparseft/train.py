"""Training: one plain loop, whose per-step logic the transformers ``Trainer`` callback
(``callback.py``) shares.

What both share lives in ``SparseController``: after every optimizer step it hands
control to the method (which may change index sets and reset optimizer entries).
"""
from __future__ import annotations

import contextlib
import math
import resource
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from .distributed import is_distributed, is_main_process, launched_distributed, wrap_ddp
from .lr_rule import AUTO, resolve_lr
from .optim import SparseAdamW


_monotonic = time.monotonic  # the clock of --save-minutes (tests replace it)


@dataclass
class TrainingArguments:
    # the sparse values' rate; "auto": lr_rule.default_lr for the model's method and budget
    lr: float | str = AUTO
    head_lr: float | None = None  # task heads and biases; defaults to ``lr``
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides ``epochs``
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    eval_every: int = 0  # optimizer steps; 0 = only at the end
    save_every: int = 0  # optimizer steps between checkpoints; 0 = none
    save_minutes: float = 0.0  # also checkpoint after this many minutes since the last one; 0 = off
    keep_checkpoints: int = 3
    skip_nonfinite: bool = False  # skip (and count) steps whose loss or gradients are NaN/inf
    seed: int = 0
    progress: bool = True
    # also print a plain line (step, loss, seconds a step, time left) every N optimizer
    # steps, for logs where a progress bar does not read (sweeps, batch jobs); 0 = off
    log_every: int = 0
    # The training forward and loss under torch.autocast(<the model's device type>, bfloat16):
    # matmuls in bf16, the trained values, their gradients and optimizer state stay float32.
    # ``eval_fn`` is called outside autocast (in the model's own dtype).
    bf16: bool = False
    # Non-reentrant activation checkpointing on the wrapped transformers model
    # (``enable_gradient_checkpointing``): less activation memory, one more forward per step.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.lr, str):
            if self.lr != AUTO:
                raise ValueError(f"lr must be a positive number or {AUTO!r}, got {self.lr!r}")
        elif self.lr <= 0:
            raise ValueError("learning rates must be positive")
        if self.head_lr is not None and self.head_lr <= 0:
            raise ValueError("learning rates must be positive")
        if self.grad_accum < 1:
            raise ValueError("grad_accum must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        if self.epochs <= 0:
            raise ValueError("epochs must be positive")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if self.save_every < 0 or self.save_minutes < 0:
            raise ValueError("save_every and save_minutes must not be negative")
        if self.log_every < 0:
            raise ValueError("log_every must not be negative")
        for name in ("bf16", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


def _log_step(result: "TrainResult", total: int, window: int) -> None:
    recent = result.step_times[-window:]
    per_step = sum(recent) / len(recent)
    left = per_step * (total - result.steps)
    print(f"step {result.steps}/{total}: loss {result.losses[-1]:.4f}, {per_step:.2f} s/step, "
          f"about {_duration(left)} left", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def planned_steps(args: TrainingArguments, num_batches: int) -> int:
    """Optimizer steps a run of ``num_batches`` micro-batches per epoch will take."""
    steps_per_epoch = math.ceil(num_batches / args.grad_accum)
    return args.max_steps or max(1, math.ceil(steps_per_epoch * args.epochs))


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped ``train`` at the end of an optimizer step.

    ``checkpoint`` is the checkpoint written then (None when ``train`` had no
    ``checkpoint_dir``); ``resume_from=checkpoint`` continues bit for bit.
    """

    def __init__(self, step: int, total: int, checkpoint: str | None):
        super().__init__(f"interrupted after step {step} of {total}")
        self.step, self.total, self.checkpoint = step, total, checkpoint


class _StopRequests:
    """While active, SIGINT and SIGTERM only ask the loop to stop at the next step
    boundary (a second signal stops at once). Main thread only: elsewhere Python
    cannot install handlers, and nothing changes."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "_StopRequests":
        if self.enabled:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0
    mean_active_entries: float | None = None  # entries trained per step, averaged over steps
    # the process's peak RSS when training ended: selection and training, not the final evaluation
    peak_rss_mb: float | None = None
    lr: float | None = None  # the rate the first parameter group started from ("auto" resolved)

    @property
    def median_step_time(self) -> float:
        return statistics.median(self.step_times) if self.step_times else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else float("nan")


def create_optimizer(model: Any, lr: float | str = AUTO, weight_decay: float = 0.0,
                     head_lr: float | None = None) -> SparseAdamW:
    """AdamW over the sparse values (with weight decay) and the dense head (without).

    ``lr="auto"`` takes the default rate for the model's method and budget (lr_rule.py).
    """
    lr = resolve_lr(lr, model)
    groups = [{"params": model.sparse_parameters(), "lr": lr, "weight_decay": weight_decay}]
    dense = model.dense_trainable_parameters()
    if dense:
        # Not packed into a flat buffer (optim.py): DDP hooks these parameters' gradient accumulators.
        groups.append({"params": dense, "lr": head_lr if head_lr is not None else lr, "weight_decay": 0.0,
                       "flat": False})
    return SparseAdamW(groups, lr=lr)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the set rate, then linear decay to zero at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak resident memory a block adds on top of what was resident when it began.

    Linux only: resets the kernel's high-water mark (``/proc/self/clear_refs``, "5")
    at the start, then reads ``VmHWM`` at the end. ``extra_mb`` is None where that
    is not available.
    """

    def __enter__(self) -> "PeakMemory":
        self.extra_mb: float | None = None
        self.start_mb = _proc_status_mb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self._armed = self.start_mb is not None
        except OSError:
            self._armed = False
        return self

    def __exit__(self, *exc) -> None:
        peak = _proc_status_mb("VmHWM") if self._armed else None
        if peak is not None:
            self.peak_mb = peak
            self.extra_mb = max(0.0, peak - self.start_mb)


@dataclass
class StepContext:
    """What ``SparseController.step`` hands the block: the step's number (1-based) and
    the batch passed to the method after the step (settable inside the block)."""

    number: int
    batch: Any = None


class SparseController:
    """The per-step logic shared by ``train`` and ``SparseCallback``.

    Order within optimizer step ``t`` (1-based): ``before_optimizer_step(t)`` (before the
    forward/backward passes), ``before_update(t)`` (gradients ready, before clipping and
    the optimizer step), ``after_optimizer_step(t)``. ``train_begin(total_steps)`` and
    ``train_end()`` bracket the run. The controller also counts the entries trained at each
    step (``mean_active_entries``).

    Under torch.distributed the controller also owns the sparse values' gradient sync
    (``sparseft.distributed``): on construction it tells DDP to ignore the values (so it
    must be built before the DDP / accelerate / Trainer wrapper is), and between
    ``train_begin`` and ``train_end`` it averages their gradients over ranks at the end
    of every backward pass.
    """

    def __init__(self, model: Any, optimizer: Any = None):
        from .distributed import SparseGradSync, ignore_sparse_values

        self.model = model
        self.optimizer = optimizer
        self.active_counts: list[int] = []
        self.steps_done = 0  # optimizer steps taken through ``step``
        self.grad_sync = None
        if hasattr(model, "sparse_parameters"):
            ignore_sparse_values(model)
            self.grad_sync = SparseGradSync(model)

    @property
    def method(self) -> Any:
        return getattr(self.model, "method", None)

    def train_begin(self, total_steps: int | None, optimizer: Any = None) -> None:
        self.active_counts = []
        self.steps_done = 0
        if self.grad_sync is not None and launched_distributed():  # one process: no hooks at all
            self.grad_sync.attach()
        if self.method is not None:
            self.method.on_train_begin(total_steps, self.model)

    def before_optimizer_step(self, step: int) -> None:
        method = getattr(self.model, "method", None)
        if method is not None:
            method.on_step_begin(step, self.model)

    def before_update(self, step: int, optimizer: Any = None) -> None:
        method = self.method
        if method is not None:
            method.on_before_update(step, self.model, optimizer or self.optimizer)
            self.active_counts.append(int(method.active_entries(self.model)))
        elif hasattr(self.model, "num_sparse_params"):
            self.active_counts.append(int(self.model.num_sparse_params()))

    @property
    def mean_active_entries(self) -> float | None:
        """Average over optimizer steps of the number of entries trained at that step."""
        return sum(self.active_counts) / len(self.active_counts) if self.active_counts else None

    def train_end(self, optimizer: Any = None) -> None:
        if self.grad_sync is not None:
            self.grad_sync.detach()
        if self.method is not None:
            self.method.on_train_end(self.model, optimizer or self.optimizer)

    def after_optimizer_step(self, step: int, batch: Any = None, optimizer: Any = None) -> None:
        method = getattr(self.model, "method", None)
        if method is not None:
            method.on_step(step, self.model, optimizer or self.optimizer, batch)

    @contextlib.contextmanager
    def step(self, optimizer: Any = None, batch: Any = None, max_grad_norm: float | None = None,
             scheduler: Any = None) -> Iterator[StepContext]:
        """One optimizer step around the caller's forward and backward passes::

            with controller.step(optimizer, batch) as s:
                model(**batch).loss.backward()

        Entering calls ``before_optimizer_step``; leaving calls ``before_update``, clips the
        gradients (``max_grad_norm``), steps the optimizer (and ``scheduler``), zeroes the
        gradients and calls ``after_optimizer_step``. Steps are numbered from 1 by the
        controller (``s.number``); an exception inside the block leaves the step untaken.
        """
        optimizer = optimizer or self.optimizer
        if optimizer is None:
            raise ValueError("controller.step needs an optimizer (pass it here or to SparseController)")
        ctx = StepContext(self.steps_done + 1, batch)
        self.before_optimizer_step(ctx.number)
        yield ctx
        self.before_update(ctx.number, optimizer)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.steps_done = ctx.number
        self.after_optimizer_step(ctx.number, ctx.batch, optimizer)


def enable_gradient_checkpointing(model: Any, checkpoint_kwargs: dict[str, Any] | None = None) -> None:
    """Activation checkpointing on the transformers model ``model`` is or wraps (a SparseModel
    passes the call to its base model); ``checkpoint_kwargs`` go to torch.utils.checkpoint
    (default: non-reentrant). It stays on after training, and acts only in training mode.
    """
    kwargs = {"use_reentrant": False} if checkpoint_kwargs is None else checkpoint_kwargs
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # its name in newer transformers
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        name = type(model).__name__
        if callable(getattr(model, "get_base_model", None)):
            name += f" wrapping {type(model.get_base_model()).__name__}"
        raise ValueError("gradient checkpointing needs a transformers model (one with gradient_checkpointing_enable "
                         f"or activation_checkpointing_enable); {name} has neither")


def _forward_precision(args: TrainingArguments, device: torch.device) -> contextlib.AbstractContextManager:
    """The context the training forward runs in: bf16 autocast with ``args.bf16``, else none."""
    if not args.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _check_bf16(args: TrainingArguments, device: torch.device) -> None:
    if args.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"bf16 autocast needs a GPU with bfloat16 support; {torch.cuda.get_device_name(device)} has none")


def _count_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if ids is not None else 0


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became NaN/inf and ``skip_nonfinite`` is off."""


def _all_finite(loss: torch.Tensor, params: list[torch.Tensor]) -> bool:
    if not bool(torch.isfinite(loss)):
        return False
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def train(
    model: Any,
    train_loader: Iterable[dict],
    args: TrainingArguments,
    eval_fn: Callable[[], dict[str, float]] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    checkpoint_dir: str | None = None,
    resume_from: str | None = None,
    checkpoint_tag: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` (a SparseModel, or any model whose batches return ``.loss``).

    ``eval_fn`` is called every ``args.eval_every`` optimizer steps (not after the last:
    the caller evaluates the final model) and its metrics are kept in ``TrainResult.history``.
    With ``checkpoint_dir``, a checkpoint is written every ``args.save_every`` steps and
    ``args.save_minutes`` minutes (either may be 0: off), and SIGINT/SIGTERM finish the
    current step, write a checkpoint and raise ``TrainingInterrupted``. ``checkpoint_tag``
    (JSON-able) is stored in every checkpoint's ``state.json`` under ``loop.tag``, so a
    caller can tell whose checkpoint it is. ``resume_from`` (a checkpoint folder) continues
    a run exactly where that checkpoint left it: same data order, RNG, optimizer,
    scheduler and method state.
    """
    with _StopRequests(enabled=checkpoint_dir is not None) as stop:
        return _train(model, train_loader, args, eval_fn, optimizer, checkpoint_dir, resume_from, checkpoint_tag, stop)


def _train(model, train_loader, args, eval_fn, optimizer, checkpoint_dir, resume_from, checkpoint_tag, stop) -> TrainResult:
    from . import checkpoint as ckpt

    torch.manual_seed(args.seed)
    total = planned_steps(args, len(train_loader))
    device = next(model.parameters()).device
    _check_bf16(args, device)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if optimizer is None:
        optimizer = create_optimizer(model, args.lr, args.weight_decay, args.head_lr)
    start_lr = optimizer.param_groups[0]["lr"]
    scheduler = linear_schedule(optimizer, int(args.warmup_ratio * total), total)
    controller = SparseController(model, optimizer)  # before the DDP wrapper: it marks the values as DDP-ignored
    # Under torch.distributed (torchrun / accelerate launch) dense trainable parameters are
    # reduced by DDP and the sparse values by the controller; each rank feeds its own shard
    # of the data (give ``train_loader`` a DistributedSampler).
    forward = model
    if is_distributed() and any(p.requires_grad for p in model.dense_trainable_parameters()):
        forward = wrap_ddp(model)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    generator = getattr(train_loader, "generator", None)
    result = TrainResult(lr=start_lr)
    controller.train_begin(total)
    loop = {"epoch": 0, "micro_in_epoch": 0}
    if resume_from is not None:  # after train_begin: the method's restored state must not be reset
        loop = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler)
        for key in ("steps", "tokens", "losses", "step_times", "history", "skipped_steps"):
            setattr(result, key, loop.pop(key))
        controller.active_counts = loop.pop("active_counts", [])
    model.train()
    bar = tqdm(total=total, initial=result.steps, desc="train", unit="step", disable=not args.progress, dynamic_ncols=True)
    started = time.perf_counter()
    step_loss, step_start, eval_seconds, last_checkpoint = 0.0, time.perf_counter(), 0.0, resume_from
    last_save_time = _monotonic()

    def save() -> str:
        state = {**loop, "steps": result.steps, "tokens": result.tokens, "losses": result.losses,
                 "step_times": result.step_times, "history": result.history,
                 "skipped_steps": result.skipped_steps, "active_counts": controller.active_counts,
                 "tag": checkpoint_tag}
        return str(ckpt.save_checkpoint(
            checkpoint_dir, result.steps, model, optimizer, scheduler, state, keep_last=args.keep_checkpoints))
    while result.steps < total:
        # The data order of an epoch is fixed by the generator state at its start; a
        # resumed run restores that state and skips the micro-batches already consumed.
        if generator is not None:
            if loop.get("epoch_generator_state") is not None:
                generator.set_state(loop["epoch_generator_state"])
            loop["epoch_generator_state"] = generator.get_state()
        batches = iter(train_loader)
        for _ in range(loop["micro_in_epoch"]):
            next(batches)
        consumed_any = False
        for batch in batches:
            consumed_any = True
            batch = _to_device(batch, device)
            if loop["micro_in_epoch"] % args.grad_accum == 0:
                controller.before_optimizer_step(result.steps + 1)
                step_finite = True
            with _forward_precision(args, device):
                loss = forward(**batch).loss
            (loss / args.grad_accum).backward()
            step_loss += loss.item() / args.grad_accum
            result.tokens += _count_tokens(batch)
            loop["micro_in_epoch"] += 1
            if loop["micro_in_epoch"] % args.grad_accum:
                step_finite = step_finite and bool(torch.isfinite(loss))
                continue
            step_finite = step_finite and _all_finite(loss, trainable)
            if not step_finite and not args.skip_nonfinite:
                where = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
                raise NonFiniteError(f"the loss or a gradient became NaN/inf at step {result.steps + 1}{where} "
                                     "(use --skip-nonfinite to skip such steps)")
            controller.before_update(result.steps + 1)
            if step_finite:
                if args.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
            else:
                result.skipped_steps += 1
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps += 1
            controller.after_optimizer_step(result.steps, batch)
            now = time.perf_counter()
            result.step_times.append(now - step_start)
            result.losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if args.log_every and result.steps % args.log_every == 0 and is_main_process():
                _log_step(result, total, args.log_every)
            step_loss, step_start = 0.0, now
            if eval_fn is not None and args.eval_every and result.steps % args.eval_every == 0 and result.steps < total:
                eval_start = time.perf_counter()
                result.history.append({"step": result.steps, **eval_fn()})
                if args.progress:
                    scores = ", ".join(f"{k} {v:.4f}" for k, v in result.history[-1].items()
                                       if k != "step" and isinstance(v, (int, float)))
                    bar.write(f"step {result.steps}/{total}: validation {scores}")
                model.train()
                step_start = time.perf_counter()
                eval_seconds += step_start - eval_start
            due = (args.save_every and result.steps % args.save_every == 0) or (
                args.save_minutes and _monotonic() - last_save_time >= 60 * args.save_minutes)
            if checkpoint_dir and (due or stop.signum is not None) and is_main_process():
                last_checkpoint = save()
                last_save_time = _monotonic()
                step_start = time.perf_counter()
            if stop.signum is not None:
                bar.close()
                raise TrainingInterrupted(result.steps, total, last_checkpoint if checkpoint_dir else None)
            if result.steps >= total:
                break
        if not consumed_any and loop["micro_in_epoch"] == 0:
            raise ValueError("the training data is empty")
        if result.steps < total:
            loop = {"epoch": loop["epoch"] + 1, "micro_in_epoch": 0}
    bar.close()
    controller.train_end()
    result.train_seconds = time.perf_counter() - started - eval_seconds
    result.mean_active_entries = controller.mean_active_entries
    result.peak_rss_mb = peak_rss_mb()
    model.eval()
    return result

