"""AdamW with a step count per entry, so index sets can grow, shrink and move.

torch's AdamW keeps one step count per parameter; an entry added at step 500 would
then get a first update of about 3x the learning rate (bias correction already
decayed). Here every entry carries its own count, and ``remap_entries`` moves state
when the index set of a sparse delta changes. While all of a parameter's entries have
the same age (a static mask, a dense silo, a head, or entries that all moved at once) the
count is one 0-dim tensor, as in torch's AdamW; it becomes a tensor of one count per entry
only when ``remap_entries`` brings entries of different ages together.

With ``flat=True`` (the default) the parameters that step together (same group, age,
device and dtype) are packed into one flat buffer, each parameter (and each of its state
tensors) a view of its own, so that step is one element-wise op per AdamW stage on the
whole buffer instead of one per parameter (a few launches per step, not a few per layer).
A parameter whose storage was replaced since (a new index set: ``set_indices``,
``remap_entries``, a loaded state dict) makes the next step pack again.

Packing moves a parameter's storage (``Tensor.set_``), which gives it a new gradient
accumulator: hooks registered on the old one, as DDP's reducer does for the parameters it
manages, no longer fire. Pack only parameters DDP ignores (sparseft's sparse values are;
``sparseft.create_optimizer`` turns packing off for the dense group with ``"flat": False``).
"""
from __future__ import annotations

import math
import weakref

import torch


class SparseAdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam, numerically the same update as ``torch.optim.AdamW``.

    Weight decay acts on the parameters it is given (the sparse values and task
    heads), never on frozen base weights.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 flat: bool = True):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        # id(step tensor) -> (weak reference to it, the common age of its entries or None)
        self._ages: dict[int, tuple[weakref.ref, int | None]] = {}
        self.flat = flat
        # (group index, ids of the parameters that stepped together) -> their _FlatPack
        self._packs: dict[tuple, _FlatPack] = {}

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        self._set_age(state["step"], 0)
        return state

    def __setstate__(self, state: dict) -> None:  # unpickling: torch's pickled state leaves the ages out
        super().__setstate__(state)
        self._ages = {}
        self._packs = {}
        self.__dict__.setdefault("flat", True)

    def _set_age(self, step: torch.Tensor, age: int | None) -> None:
        self._ages[id(step)] = (weakref.ref(step), age)

    def _age(self, step: torch.Tensor) -> int | None:
        """The common step count of a parameter's entries, tracked on the host; looked up
        from the tensor (one device sync) when the state is new to it (restored from a
        checkpoint or a state dict, or replaced by other code)."""
        known = self._ages.get(id(step))
        if known is not None and known[0]() is step:
            return known[1]
        age = self._common_age(step)
        self._set_age(step, age)
        return age

    @staticmethod
    def _common_age(step: torch.Tensor) -> int | None:
        """Every entry's step count if they all agree, else None (one device sync)."""
        if not step.numel():
            return 0
        first = step.view(-1)[:1]
        return int(first) if bool((step == first).all()) else None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g, group in enumerate(self.param_groups):
            # Parameters whose entries all have the same age (static masks, dense silos, heads)
            # take torch's AdamW arithmetic with scalar bias corrections, batched by age with
            # foreach ops. The age is tracked on the host (None once entries of different ages
            # mix), so no step reads the per-entry counts back from the device.
            same_age: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state = self._init_state(p)
                if state["exp_avg"].shape != p.shape:
                    raise RuntimeError(
                        "a parameter changed size without remap_entries(); its optimizer state no longer lines up"
                    )
                age = self._age(state["step"])
                if age is not None:
                    self._set_age(state["step"], age + 1)
                    same_age.setdefault((age + 1, p.device, p.dtype), []).append(p)
                else:
                    self._per_entry_update(p, state, group)
            for (age, _, _), params in same_age.items():
                flat = group.get("flat", self.flat)
                pack = self._pack(g, params) if flat and len(params) > 1 else None
                if pack is not None:
                    self._flat_update(pack, params, age, group)
                else:
                    self._same_age_update(params, age, group)
        return loss

    def _same_age_update(self, params: list[torch.Tensor], age: int, group: dict) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_add_([s["step"] for s in states], 1)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, math.sqrt(1 - beta2 ** age))
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, value=-lr / (1 - beta1 ** age))

    def _pack(self, g: int, params: list[torch.Tensor]) -> "_FlatPack | None":
        """The flat pack of these parameters and their state, (re)built when missing or stale;
        None where they cannot share a buffer (sharded or non-contiguous tensors)."""
        if any(hasattr(p, "to_local") or not p.is_contiguous() for p in params):
            return None
        key = (g, tuple(id(p) for p in params))
        pack = self._packs.get(key)
        states = [self.state[p] for p in params]
        if pack is not None and pack.holds(params, states):
            return pack
        pack = _FlatPack(params, states)
        self._packs = {k: v for k, v in self._packs.items() if k[0] != g}  # one pack per group
        self._packs[key] = pack
        return pack

    def _flat_update(self, pack: "_FlatPack", params: list[torch.Tensor], age: int, group: dict) -> None:
        """``_same_age_update`` on the packed buffers: the same element-wise arithmetic (so the
        same numbers, bit for bit), one op per stage."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        grad = pack.gather_grads(params)
        values, exp_avg, exp_avg_sq = pack.values, pack.exp_avg, pack.exp_avg_sq
        torch._foreach_add_([self.state[p]["step"] for p in params], 1)
        if wd:
            values.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2)
        exp_avg_sq.addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq.sqrt()
        denom.div_(math.sqrt(1 - beta2 ** age))
        denom.add_(eps)
        values.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** age))

    @staticmethod
    def _per_entry_update(p: torch.Tensor, state: dict, group: dict) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        grad = p.grad
        step = state["step"].add_(1)
        if wd:
            p.mul_(1 - lr * wd)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if step.is_cuda or not step.numel():  # reading the oldest age back would sync the device
            bias_c1 = 1 - torch.pow(beta1, step.double())
            bias_c2_sqrt = (1 - torch.pow(beta2, step.double())).sqrt()
        else:
            # Bias corrections per age from a table (ages are few: at most one per step so
            # far): the same float64 values as two pows per entry, at a fraction of the cost.
            ages = torch.arange(int(step.max()) + 1, dtype=torch.float64)
            at = step.long()
            bias_c1 = (1 - torch.pow(beta1, ages))[at]
            bias_c2_sqrt = (1 - torch.pow(beta2, ages)).sqrt()[at]
        denom = (exp_avg_sq.double().sqrt() / bias_c2_sqrt).add_(eps)
        update = exp_avg.double() / bias_c1 / denom
        p.sub_((lr * update).to(p.dtype))

    @torch.no_grad()
    def remap_entries(self, p: torch.Tensor, old_positions: torch.Tensor, new_positions: torch.Tensor) -> None:
        """After ``p`` got a new index set: entry ``old_positions[i]`` now lives at
        ``new_positions[i]``; every other entry of ``p`` starts fresh (zero moments, step 0)."""
        old = self.state.get(p)
        if not old:
            return
        old_positions = old_positions.long()
        new_positions = new_positions.long()
        # The entries' common age survives only if no fresh entry (age 0) joins older ones.
        age = self._age(old["step"])
        if new_positions.numel() == 0:
            age = 0
        elif new_positions.numel() != p.numel() and age != 0:
            age = None
        fresh = {}
        for key, val in old.items():
            if key == "step" and age is not None:
                fresh[key] = torch.full((), float(age), dtype=val.dtype, device=p.device)
                continue
            fresh[key] = torch.zeros(p.shape, dtype=val.dtype, device=p.device)
            fresh[key][new_positions] = val[old_positions] if val.dim() else val
        self._ages.pop(id(old["step"]), None)
        self._set_age(fresh["step"], age)
        self.state[p] = fresh


class _FlatPack:
    """Parameters (and their exp_avg, exp_avg_sq) moved into flat buffers, each one a view
    at the same offset of its buffer; plus a flat buffer their gradients are gathered into
    at each step. Their step counts (all of one age) stay separate 0-dim tensors."""

    KEYS = ("exp_avg", "exp_avg_sq")

    @torch.no_grad()
    def __init__(self, params: list[torch.Tensor], states: list[dict]):
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        first = params[0]
        self.values = torch.empty(total, dtype=first.dtype, device=first.device)
        self.exp_avg = torch.empty_like(self.values)
        self.exp_avg_sq = torch.empty_like(self.values)
        self.grad = torch.empty_like(self.values)
        self.offsets = []
        offset = 0
        for p, state, n in zip(params, states, sizes):
            self.offsets.append(offset)
            for buf, src in ((self.values, p), (self.exp_avg, state["exp_avg"]), (self.exp_avg_sq, state["exp_avg_sq"])):
                buf[offset:offset + n].copy_(src.reshape(-1))
            p.set_(self.values.untyped_storage(), offset, p.shape, p.stride())
            for key, buf in zip(self.KEYS, (self.exp_avg, self.exp_avg_sq)):
                state[key] = buf[offset:offset + n].view(state[key].shape)
            offset += n
        self._pointers = self._layout(params, states)

    @staticmethod
    def _layout(params: list[torch.Tensor], states: list[dict]) -> tuple:
        return tuple((p.data_ptr(), p.numel(), *(s[k].data_ptr() for k in _FlatPack.KEYS)) for p, s in zip(params, states))

    def holds(self, params: list[torch.Tensor], states: list[dict]) -> bool:
        """Whether the parameters and their state are still the views this pack made."""
        return self._layout(params, states) == self._pointers

    def gather_grads(self, params: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in params], out=self.grad)
