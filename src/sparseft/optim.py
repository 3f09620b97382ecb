"""AdamW with a step count per entry, so index sets can grow, shrink and move.

torch's AdamW keeps one step count per parameter; an entry added at step 500 would
then get a first update of about 3x the learning rate (bias correction already
decayed). Here every entry carries its own count, and ``remap_entries`` moves state
when the index set of a sparse delta changes.
"""
from __future__ import annotations

import math

import torch


class SparseAdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam, numerically the same update as ``torch.optim.AdamW``.

    Weight decay acts on the parameters it is given (the sparse values and task
    heads), never on frozen base weights.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
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
                grad = p.grad
                step = state["step"].add_(1)
                if wd:
                    p.mul_(1 - lr * wd)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                first = step.view(-1)[:1]
                if step.numel() and bool((step == first).all()):
                    # Every entry has the same age (static masks, dense silos): torch's own
                    # AdamW arithmetic with scalar bias corrections, no per-entry pow.
                    t = float(first)
                    bias_c2_sqrt = math.sqrt(1 - beta2 ** t)
                    denom = (exp_avg_sq.sqrt() / bias_c2_sqrt).add_(eps)
                    p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** t))
                    continue
                bias_c1 = 1 - torch.pow(beta1, step.double())
                bias_c2_sqrt = (1 - torch.pow(beta2, step.double())).sqrt()
                denom = (exp_avg_sq.double().sqrt() / bias_c2_sqrt).add_(eps)
                update = exp_avg.double() / bias_c1 / denom
                p.sub_((lr * update).to(p.dtype))
        return loss

    @torch.no_grad()
    def remap_entries(self, p: torch.Tensor, old_positions: torch.Tensor, new_positions: torch.Tensor) -> None:
        """After ``p`` got a new index set: entry ``old_positions[i]`` now lives at
        ``new_positions[i]``; every other entry of ``p`` starts fresh (zero moments, step 0)."""
        old = self.state.get(p)
        if not old:
            return
        fresh = {key: torch.zeros(p.shape, dtype=val.dtype, device=p.device) for key, val in old.items()}
        old_positions = old_positions.long()
        new_positions = new_positions.long()
        for key in fresh:
            fresh[key][new_positions] = old[key][old_positions]
        self.state[p] = fresh
