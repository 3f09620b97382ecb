"""One experiment end to end: task + model + method -> trained adapter and metrics.json.

The CLI's ``train`` and ``eval`` commands (and sweeps) are thin layers over this.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import native
from ..config import CALIBRATION_METHODS, KNOWN_METHODS, SparseConfig
from ..model import SparseModel, get_sparse_model, read_adapter
from .pretrained import DEFAULT_MODEL, load_classifier
from .tasks import TaskData, evaluate_classifier, get_task, majority_rate, make_loader, task_from_files
from ..train import PeakMemory, TrainingArguments, peak_rss_mb, train

# Random masking needs a much larger rate than full fine-tuning (Xu & Zhang 2024); the
# other scorers train just as few entries and get the same default.
DEFAULT_LR = {m: 5e-3 for m in KNOWN_METHODS}
FALLBACK_LR = 2e-3
DEFAULT_HEAD_LR = 2e-3


@dataclass
class TaskOptions:
    task: str = "rt-sentiment"
    train_file: str | None = None
    eval_file: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    max_length: int = 64
    batch_size: int = 32
    eval_batch_size: int = 128
    # causal-LM generation tasks from your own files (harness.py / lmtasks.py)
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
    baseline: Any = None  # a baselines.BaselineConfig: train LoRA/full/SHiRA/... instead
    device: str = "cpu"  # cpu, cuda, cuda:N or auto (cuda when available)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch build or machine has no CUDA device")
    return device


def reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def default_lr(method: str) -> float:
    from .baselines import DEFAULT_LR as BASELINE_LR

    return DEFAULT_LR.get(method, BASELINE_LR.get(method, FALLBACK_LR))


def load_task(opts: TaskOptions, seed: int) -> TaskData:
    if opts.train_file or opts.eval_file:
        if not (opts.train_file and opts.eval_file):
            raise ValueError("--train-file and --eval-file go together")
        return task_from_files(opts.train_file, opts.eval_file, opts.text_column, opts.label_column)
    return get_task(opts.task, seed=seed, max_train_examples=opts.max_train_examples,
                    max_eval_examples=opts.max_eval_examples)


def _evaluate_splits(model, task: TaskData, tokenizer, opts: TaskOptions) -> dict[str, dict[str, float]]:
    return {
        split: evaluate_classifier(model, make_loader(getattr(task, split), tokenizer, opts.eval_batch_size, opts.max_length))
        for split in ("validation", "test")
    }


SPEC_NAME = "run_spec.json"
CHECKPOINTS = "checkpoints"


def spec_to_dict(spec: RunSpec) -> dict[str, Any]:
    return {"out": spec.out, "model": spec.model, "data": asdict(spec.data),
            "sparse": spec.sparse.to_dict(), "training": asdict(spec.training), "device": spec.device}


def spec_from_dict(data: dict[str, Any]) -> RunSpec:
    return RunSpec(out=data["out"], model=data["model"], data=TaskOptions(**data["data"]),
                   sparse=SparseConfig.from_dict(data["sparse"]), training=TrainingArguments(**data["training"]),
                   device=data.get("device", "cpu"))


def resume_training(run_dir: str) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its newest complete checkpoint."""
    from ..checkpoint import latest_checkpoint

    spec_path = Path(run_dir) / SPEC_NAME
    if not spec_path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no {SPEC_NAME}: not a sparseft run folder")
    spec = spec_from_dict(json.loads(spec_path.read_text()))
    spec.out = str(run_dir)
    found = latest_checkpoint(Path(run_dir) / CHECKPOINTS)
    if found is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint to resume from (train with --save-every N)")
    return run_training(spec, resume_from=str(found))


def run_training(spec: RunSpec, resume_from: str | None = None) -> dict[str, Any]:
    """Train one sparse fine-tune and write ``<out>/metrics.json`` and ``<out>/adapter/``."""
    from .harness import is_causal_run, run_experiment

    if spec.baseline is not None or is_causal_run(spec):  # baselines, causal-LM tasks
        if resume_from is not None:
            raise ValueError("--resume supports sparse runs on classification tasks; this run is a baseline or a causal-LM task")
        return run_experiment(spec)
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    if resume_from is None:
        write_json(out / SPEC_NAME, spec_to_dict(spec))
    seed = spec.training.seed
    torch.manual_seed(seed)
    task = load_task(spec.data, seed)
    device = resolve_device(spec.device)
    base, tokenizer, new_heads = load_classifier(spec.model, task.num_labels)
    base.to(device)
    if not spec.sparse.modules_to_save:
        spec.sparse.modules_to_save = new_heads
    calibration = calibration_batches(task, tokenizer, spec) if spec.sparse.method in CALIBRATION_METHODS else None
    select_start = time.perf_counter()
    reset_gpu_peak(device)
    with PeakMemory() as select_mem:
        model = get_sparse_model(base, spec.sparse, calibration_data=calibration)
    select_seconds = time.perf_counter() - select_start
    select_gpu_mb = gpu_peak_mb(device)
    reset_gpu_peak(device)
    del calibration
    train_loader = make_loader(task.train, tokenizer, spec.data.batch_size, spec.data.max_length, shuffle=True, seed=seed)
    val_loader = make_loader(task.validation, tokenizer, spec.data.eval_batch_size, spec.data.max_length)
    result = train(model, train_loader, spec.training, eval_fn=lambda: evaluate_classifier(model, val_loader),
                   checkpoint_dir=str(out / CHECKPOINTS), resume_from=resume_from)
    scores = _evaluate_splits(model, task, tokenizer, spec.data)
    adapter_dir = out / "adapter"
    model.save_pretrained(adapter_dir, extra_metadata={"sparseft_run": _run_record(spec, task)})
    summary = model.trainable_summary()
    metrics = {
        "task": task.name,
        "method": spec.sparse.method,
        "model": spec.model,
        "metric": task.metric,
        "score": scores["test"][task.metric],
        "validation_score": scores["validation"][task.metric],
        "test": scores["test"],
        "validation": scores["validation"],
        "majority_rate": majority_rate(task.test),
        "trainable_params": summary["sparse_params"],
        "head_params": summary["head_params"],
        "targeted_weights": summary["targeted_weights"],
        "density": summary["density"],
        "resumed_from": resume_from,
        "selection_seconds": select_seconds,
        "selection_extra_rss_mb": select_mem.extra_mb,
        "selection_peak_gpu_mb": select_gpu_mb,
        "calibration_examples": min(spec.sparse.calib_examples, len(task.train))
        if spec.sparse.method in CALIBRATION_METHODS else 0,
        "folded_params": model.num_folded_params(),
        "mask_updates": getattr(model.method, "history", []),
        "adapter_bytes": sum(f.stat().st_size for f in adapter_dir.iterdir()),
        "config": spec.sparse.to_dict(),
    }
    metrics.update(run_metrics(spec, result))
    write_json(out / "metrics.json", metrics)
    return metrics


def run_metrics(spec: RunSpec, result) -> dict[str, Any]:
    """The metrics every run reports, whatever it trains (shared with harness.py)."""
    device = resolve_device(spec.device)
    return {
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        # entries trained per optimizer step, averaged over steps (static: = the budget;
        # ID3: about half of it; DST: every entry of the tuned matrices)
        "mean_active_entries": result.mean_active_entries,
        "step_time_s": result.median_step_time,
        "tokens_per_s": result.tokens_per_second,
        "train_seconds": result.train_seconds,
        "final_train_loss": result.losses[-1] if result.losses else None,
        "peak_rss_mb": peak_rss_mb(),  # the whole run, final evaluation included
        "train_peak_rss_mb": result.peak_rss_mb,  # up to the end of training (what the method costs)
        # CUDA runs: the allocator's peak during training and evaluation (selection apart)
        "peak_gpu_mb": gpu_peak_mb(device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "seed": spec.training.seed,
        "lr": spec.training.lr,
        "history": result.history,
        "training": asdict(spec.training),
        "data": asdict(spec.data),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        # which CPU SDDMM ran: sparseft's compiled kernel, or torch's (no C compiler)
        "cpu_sddmm": None if device.type == "cuda" else ("compiled" if native.library() is not None else "torch"),
    }


def calibration_batches(task: TaskData, tokenizer, spec: RunSpec) -> list[dict]:
    """The first ``calib_examples`` training examples in a seeded order (capped by the
    training set), batched like training batches, labels included."""
    n = min(spec.sparse.calib_examples, len(task.train))
    order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(spec.training.seed))[:n]
    examples = [task.train[i] for i in order.tolist()]
    return list(make_loader(examples, tokenizer, spec.data.calib_batch_size or spec.data.batch_size, spec.data.max_length))


def _run_record(spec: RunSpec, task: TaskData) -> dict[str, Any]:
    """What ``eval`` needs to rebuild the model and data without being told again."""
    return {"model": spec.model, "task": task.name, "label_names": task.label_names,
            "max_length": spec.data.max_length, "data": asdict(spec.data), "seed": spec.training.seed}


def evaluate_adapter(adapter: str, opts: TaskOptions | None = None, model: str | None = None,
                     force: bool = False, seed: int | None = None) -> dict[str, Any]:
    """Re-score a saved adapter on its task (or the one given)."""
    meta, _ = read_adapter(adapter)
    record = meta.get("sparseft_run", {})
    if opts is None:
        opts = TaskOptions(**record.get("data", {})) if record.get("data") else TaskOptions()
    seed = record.get("seed", 0) if seed is None else seed
    from .harness import evaluate_causal_adapter, is_causal_run

    if is_causal_run(RunSpec(out="", data=opts)):  # causal-LM tasks (harness.py)
        return evaluate_causal_adapter(adapter, opts, model or record.get("model", DEFAULT_MODEL), force, seed)
    task = load_task(opts, seed)
    base, tokenizer, _ = load_classifier(model or record.get("model", DEFAULT_MODEL), task.num_labels)
    sparse = SparseModel.from_pretrained(base, adapter, force=force)
    scores = _evaluate_splits(sparse, task, tokenizer, opts)
    return {"adapter": str(adapter), "task": task.name, "metric": task.metric,
            "score": scores["test"][task.metric], **scores}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)
