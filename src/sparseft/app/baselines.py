"""Baselines in the same pipeline as the sparse methods: LoRA, full fine-tuning, and
peft's own sparse methods SHiRA and Super-Tuning (outside references).

Each baseline targets exactly the modules a sparse run would (``find_target_modules``
with the same patterns: ``all-linear`` minus the output head), trains new task heads
densely (peft's ``modules_to_save``), and reports its parameters the same way as a
SparseModel: ``sparse_params`` = trainable parameters outside the task heads,
``head_params`` apart.

Budgets: LoRA and SHiRA take a rank r (SHiRA trains r*(in+out) entries per matrix,
as many as LoRA of rank r); Super-Tuning takes a density. A sparse budget converts:
``match_lora_rank=r`` is rank r (or density r*(in+out)/(in*out) overall), a density is
the nearest rank >= 1.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import quant
from ..config import QUANTIZE_FORMATS, ConfigError
from ..delta import linear_shape
from ..inject import find_target_modules, output_head_names
from ..train import enable_gradient_checkpointing

BASELINE_METHODS = ("lora", "full", "shira", "supertuning")
DEFAULT_LR = {"lora": 5e-4, "full": 5e-5, "shira": 5e-3, "supertuning": 5e-3}


@dataclass
class BaselineConfig:
    method: str = "lora"
    # exactly one budget (ignored by "full"); defaults to rank 8
    lora_rank: int | None = None
    density: float | None = None
    num_params: int | None = None
    match_lora_rank: int | None = None
    lora_alpha: float | None = None  # default 2 * rank
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    modules_to_save: tuple[str, ...] | list[str] = ()
    seed: int = 0
    # Quantize the targeted layers' frozen weights first ("nf4" or "int8", bitsandbytes):
    # LoRA on an NF4 base is QLoRA. Only LoRA takes a quantized base here.
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.method not in BASELINE_METHODS:
            raise ConfigError(f"baseline {self.method!r} is not known; choose one of {', '.join(BASELINE_METHODS)}")
        given = [n for n in ("lora_rank", "density", "num_params", "match_lora_rank") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(f"give exactly one budget, not {' and '.join(given)}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")
        for name in ("lora_rank", "num_params", "match_lora_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.quantize is not None:
            if self.quantize not in QUANTIZE_FORMATS:
                raise ConfigError(f"quantize={self.quantize!r}; choose one of {', '.join(QUANTIZE_FORMATS)}")
            if self.method != "lora":
                raise ConfigError(f"quantize with a baseline is for lora (QLoRA on a quantized base), not "
                                  f"{self.method}" + (": full fine-tuning trains the float weights themselves"
                                                      if self.method == "full" else ""))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modules_to_save"] = list(self.modules_to_save)
        return d


def target_shapes(model: nn.Module, cfg: BaselineConfig) -> dict[str, tuple[int, int]]:
    names = find_target_modules(model, cfg.target_modules, modules_to_save=cfg.modules_to_save)
    return {name: linear_shape(model.get_submodule(name)) for name in names}


def resolve_rank(cfg: BaselineConfig, shapes: dict[str, tuple[int, int]]) -> int:
    """The LoRA/SHiRA rank for this budget (the nearest rank >= 1 for a density or count)."""
    if cfg.lora_rank is not None:
        return cfg.lora_rank
    if cfg.match_lora_rank is not None:
        return cfg.match_lora_rank
    per_rank = sum(o + i for o, i in shapes.values())
    if cfg.num_params is not None:
        return max(1, round(cfg.num_params / per_rank))
    if cfg.density is not None:
        return max(1, round(cfg.density * sum(o * i for o, i in shapes.values()) / per_rank))
    return 8


def resolve_density(cfg: BaselineConfig, shapes: dict[str, tuple[int, int]]) -> float:
    total = sum(o * i for o, i in shapes.values())
    if cfg.density is not None:
        return cfg.density
    if cfg.num_params is not None:
        return min(1.0, cfg.num_params / total)
    rank = cfg.lora_rank or cfg.match_lora_rank or 8
    return min(1.0, rank * sum(o + i for o, i in shapes.values()) / total)


def _peft():
    try:
        with quant.quiet_bitsandbytes_import():  # peft imports bitsandbytes whenever it is installed
            import peft
    except ImportError:
        raise ConfigError("the LoRA/SHiRA/Super-Tuning baselines need peft: pip install 'sparseft[baselines]'") from None
    return peft


class BaselineModel(nn.Module):
    """A model trained by a baseline method, with the SparseModel-like bits the runner uses."""

    def __init__(self, model: nn.Module, cfg: BaselineConfig, target_names: list[str], info: dict[str, Any]):
        super().__init__()
        self.model = model
        self.baseline_config = cfg
        self.target_names = target_names
        self.info = info
        self.head_names = list(cfg.modules_to_save)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
        """Checkpointing on the transformers model underneath (through peft's wrapper)."""
        enable_gradient_checkpointing(self.model, activation_checkpointing_kwargs)

    def _is_head(self, name: str) -> bool:
        parts = name.split(".")
        return any(h in parts for h in self.head_names)

    def trainable_named(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def trainable_summary(self) -> dict[str, Any]:
        named = self.trainable_named()
        head = sum(p.numel() for n, p in named if self._is_head(n))
        body = sum(p.numel() for n, p in named if not self._is_head(n))
        targeted = self.info["targeted_weights"]
        return {"sparse_params": body, "head_params": head, "targeted_weights": targeted,
                "density": body / targeted if targeted else float("nan")}

    def create_optimizer(self, lr: float, weight_decay: float = 0.0, head_lr: float | None = None) -> torch.optim.Optimizer:
        named = self.trainable_named()
        groups = [{"params": [p for n, p in named if not self._is_head(n)], "lr": lr, "weight_decay": weight_decay}]
        head = [p for n, p in named if self._is_head(n)]
        if head:
            groups.append({"params": head, "lr": head_lr if head_lr is not None else lr, "weight_decay": 0.0})
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)

    def save(self, path: str | os.PathLike) -> int:
        """Save what the baseline trained; returns bytes written. Full fine-tuning writes
        nothing (a whole model per run) and returns the size its trainable tensors would take."""
        out = Path(path)
        if self.baseline_config.method == "full":
            return sum(p.numel() * p.element_size() for _, p in self.trainable_named())
        self.model.save_pretrained(out)
        return sum(f.stat().st_size for f in out.iterdir() if f.is_file())


def get_baseline_model(base: nn.Module, cfg: BaselineConfig) -> BaselineModel:
    """Wrap ``base`` for the baseline ``cfg.method`` (values of new parameters start so that
    outputs are unchanged, as peft does by default)."""
    shapes = target_shapes(base, cfg)
    names = list(shapes)
    targeted = sum(o * i for o, i in shapes.values())
    heads = list(cfg.modules_to_save)
    info: dict[str, Any] = {"targeted_weights": targeted, "num_targets": len(names)}
    if cfg.quantize is not None:
        from ..quant import quantize_modules

        quantize_modules(base, names, cfg.quantize)
        info["quantize"] = cfg.quantize
    torch.manual_seed(cfg.seed)
    if cfg.method == "full":
        for p in base.parameters():  # nothing is frozen: embeddings and any LM output head train too
            p.requires_grad_(True)
        heads_out = sorted(output_head_names(base))
        info["note"] = "all parameters trained" + (f" (output head {heads_out} included)" if heads_out else "")
        return BaselineModel(base, cfg, names, info)
    peft = _peft()
    if cfg.method == "lora":
        rank = resolve_rank(cfg, shapes)
        pcfg = peft.LoraConfig(r=rank, lora_alpha=cfg.lora_alpha or 2 * rank, lora_dropout=cfg.lora_dropout,
                               target_modules=names, modules_to_save=heads or None, bias="none")
        info["rank"] = rank
    elif cfg.method == "shira":
        rank = resolve_rank(cfg, shapes)
        pcfg = peft.ShiraConfig(r=rank, target_modules=names, modules_to_save=heads or None, random_seed=cfg.seed)
        info["rank"] = rank
    else:  # supertuning
        density = resolve_density(cfg, shapes)
        pcfg = peft.SupertuningConfig(sparsity=1.0 - density, target_modules=names, modules_to_save=heads or None)
        info["density"] = density
    model = peft.get_peft_model(base, pcfg)
    return BaselineModel(model, cfg, names, info)


def load_baseline(base: nn.Module, path: str | os.PathLike) -> nn.Module:
    """The baseline adapter folder ``path`` (peft's, written by ``BaselineModel.save``) on
    ``base``, in eval mode: what ``sparseft eval`` scores."""
    model = _peft().PeftModel.from_pretrained(base, str(path))
    model.eval()
    return model
