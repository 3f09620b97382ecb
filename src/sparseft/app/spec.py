"""What one ``sparseft train`` run is: the data options, the model, the method (a sparse
config or a baseline), the training arguments and the device. ``run_spec.json`` in a
run folder is this, as JSON, so that ``--resume`` rebuilds the same run."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import SparseConfig
from ..train import TrainingArguments
from .baselines import BaselineConfig
from .data import VALIDATION_FRACTION
from .pretrained import DEFAULT_MODEL


@dataclass
class TaskOptions:
    task: str = "rt-sentiment"
    train_file: str | None = None
    eval_file: str | None = None  # your own data: the test split
    # Your own data's validation split (what learning rates are chosen on): this file, else
    # this fraction of the training file (seeded by the run's seed, data.carve_validation),
    # else (0) the eval file, which is then both validation and test.
    validation_file: str | None = None
    validation_split: float = VALIDATION_FRACTION
    text_column: str = "text"
    label_column: str = "label"
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    max_length: int = 64
    batch_size: int = 32
    eval_batch_size: int = 128
    # causal-LM generation tasks from your own files (lmtasks.py)
    prompt_column: str | None = None
    target_column: str | None = None
    max_new_tokens: int = 8
    # Batch size of the calibration passes (default: batch_size). Selection memory is the
    # score buffers plus one calibration batch's activations: smaller batches, less memory.
    calib_batch_size: int | None = None


@dataclass
class RunSpec:
    out: str
    model: str = DEFAULT_MODEL
    data: TaskOptions = field(default_factory=TaskOptions)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    training: TrainingArguments = field(default_factory=TrainingArguments)
    baseline: BaselineConfig | None = None  # train LoRA/full/SHiRA/Super-Tuning instead of a sparse method
    device: str = "auto"  # cpu, cuda, cuda:N or auto (cuda when available)

    @property
    def method(self) -> str:
        return self.baseline.method if self.baseline is not None else self.sparse.method


def spec_to_dict(spec: RunSpec) -> dict[str, Any]:
    return {"out": spec.out, "model": spec.model, "data": asdict(spec.data), "sparse": spec.sparse.to_dict(),
            "training": asdict(spec.training), "device": spec.device,
            "baseline": spec.baseline.to_dict() if spec.baseline is not None else None}


def spec_from_dict(data: dict[str, Any]) -> RunSpec:
    baseline = data.get("baseline")
    return RunSpec(out=data["out"], model=data["model"], data=task_options_from_dict(data["data"]),
                   sparse=SparseConfig.from_dict(data["sparse"]), training=TrainingArguments(**data["training"]),
                   baseline=BaselineConfig(**baseline) if baseline is not None else None,
                   device=data.get("device", "cpu"))


def task_options_from_dict(data: dict[str, Any]) -> TaskOptions:
    """TaskOptions as recorded in a run spec or an adapter. Records written before the
    validation split existed validated on the eval file: they keep doing so."""
    return TaskOptions(**{"validation_split": 0.0, **data})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch build or machine has no CUDA device")
    return device
