"""The one pipeline behind every ``sparseft train`` run: task + model + method ->
trained adapter and ``metrics.json``.

Sparse methods and baselines (LoRA, full, SHiRA, Super-Tuning), classification and
causal-LM tasks all go through ``run_training``: the same seeded calibration order
(``prepare.calibration_order``), the same checkpoints and ``--resume``, the same
metrics.json fields. The CLI's ``train`` and ``eval`` commands and sweeps are thin
layers over this module.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import native, registry
from ..checkpoint import latest_checkpoint
from ..lr_rule import AUTO
from ..model import SparseModel, get_sparse_model, read_adapter
from ..train import PeakMemory, TrainingArguments, peak_rss_mb, planned_steps, train
from . import guard_rails, run_folder
from .baselines import DEFAULT_LR as BASELINE_LR
from .baselines import get_baseline_model, load_baseline
from .prepare import Setup, calibration_batches, prepare
from .pretrained import DEFAULT_MODEL
from .spec import RunSpec, TaskOptions, resolve_device, spec_from_dict, spec_to_dict, task_options_from_dict

__all__ = ["RunSpec", "TaskOptions", "run_training", "resume_training", "evaluate_adapter", "default_lr"]

DEFAULT_HEAD_LR = 2e-3

SPEC_NAME = run_folder.SPEC_NAME
CHECKPOINTS = run_folder.CHECKPOINTS
ADAPTER = run_folder.ADAPTER
# A baseline's adapter is peft's folder; this file beside it says how to rebuild its run.
BASELINE_RECORD = "sparseft_run.json"


def default_lr(method: str) -> float | str:
    """A baseline's own default rate; "auto" (lr_rule.py: by method and budget) for sparse methods."""
    return BASELINE_LR.get(method, AUTO)


def reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def resume_training(run_dir: str) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its newest complete checkpoint, after checking
    that the checkpoint was written under the run's recorded settings."""
    recorded = run_folder.read_spec(run_dir)
    found, _ = run_folder.resumable_checkpoint(run_dir, recorded)
    spec = spec_from_dict(recorded)
    spec.out = str(run_dir)
    return run_training(spec, resume_from=str(found))


def uses_calibration(spec: RunSpec) -> bool:
    return spec.baseline is None and registry.get(spec.sparse.method).needs_calibration


def _build_model(spec: RunSpec, setup: Setup):
    """The trainable model, its optimizer (None: ``train``'s SparseAdamW) and the method's
    config as recorded in metrics.json."""
    if spec.baseline is not None:
        if not spec.baseline.modules_to_save:
            spec.baseline.modules_to_save = list(setup.new_heads)
        model = get_baseline_model(setup.base, spec.baseline)
        lr = BASELINE_LR[spec.baseline.method] if spec.training.lr == AUTO else spec.training.lr  # the rule is for sparse values
        optimizer = model.create_optimizer(lr, spec.training.weight_decay, spec.training.head_lr)
        return model, optimizer, {**spec.baseline.to_dict(), **model.info}
    if not spec.sparse.modules_to_save:
        spec.sparse.modules_to_save = list(setup.new_heads)
    calibration = None
    if uses_calibration(spec):
        calibration = calibration_batches(setup.train_loader, spec.sparse.calibration.examples,
                                          spec.data.calib_batch_size or spec.data.batch_size, spec.training.seed)
        guard_rails.announce_calibration(spec.sparse.method, sum(len(b["input_ids"]) for b in calibration),
                                         len(calibration))
    model = get_sparse_model(setup.base, spec.sparse, calibration_data=calibration)
    return model, None, spec.sparse.to_dict()


def run_training(spec: RunSpec, resume_from: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train one run and write ``<out>/metrics.json`` and ``<out>/adapter/``, with
    checkpoints under ``<out>/checkpoints/`` (every ``save_every`` steps and
    ``save_minutes`` minutes, and on SIGINT/SIGTERM) that ``resume_from`` (one of them)
    continues from. A new run refuses a folder that holds another run unless ``overwrite``."""
    out = run_folder.claim(spec.out, overwrite) if resume_from is None else Path(spec.out)
    # before modules_to_save is filled in; a resumed run's checkpoints carry the settings its
    # run_spec.json records (as written, even by an older version)
    tag = run_folder.checkpoint_tag(spec_to_dict(spec) if resume_from is None else run_folder.read_spec(out))
    if resume_from is None:
        write_json(out / SPEC_NAME, spec_to_dict(spec))
    seed = spec.training.seed
    torch.manual_seed(seed)
    device = resolve_device(spec.device)
    setup = prepare(spec)
    setup.base.to(device)
    select_start = time.perf_counter()
    reset_gpu_peak(device)
    with PeakMemory() as select_mem:
        model, optimizer, config = _build_model(spec, setup)
    select_seconds = time.perf_counter() - select_start
    select_gpu_mb = gpu_peak_mb(device)
    reset_gpu_peak(device)
    total = planned_steps(spec.training, len(setup.train_loader))
    if resume_from is None:
        labels = setup.record.get("label_names") and [e.label for e in setup.train_loader.dataset]
        guard_rails.warn(guard_rails.short_run_warnings(total, spec.training, labels or None,
                                                        setup.record.get("label_names")))
    else:
        print(f"resuming {out} at step {run_folder.checkpoint_step(resume_from)} of {total} from {resume_from}", flush=True)
    result = train(model, setup.train_loader, spec.training, optimizer=optimizer,
                   eval_fn=lambda: _without_examples(setup.evaluate(model, "validation")),
                   checkpoint_dir=str(out / CHECKPOINTS), resume_from=resume_from, checkpoint_tag=tag)
    scores = {split: setup.evaluate(model, split) for split in ("validation", "test")}
    adapter_bytes = _save_adapter(model, spec, setup, out / ADAPTER)
    summary = model.trainable_summary()
    metrics = {
        "task": setup.task_name,
        "method": spec.method,
        "model": spec.model,
        "metric": setup.metric,
        "higher_is_better": setup.higher_is_better,
        "score": scores["test"][setup.metric],
        "validation_score": scores["validation"][setup.metric],
        "test": scores["test"],
        "validation": scores["validation"],
        "validation_data": setup.validation_data,
        "majority_rate": setup.majority_rate,
        "trainable_params": summary["sparse_params"],
        "head_params": summary["head_params"],
        "targeted_weights": summary["targeted_weights"],
        "density": summary["density"],
        "resumed_from": resume_from,
        "selection_seconds": select_seconds,
        "selection_extra_rss_mb": select_mem.extra_mb,
        "selection_peak_gpu_mb": select_gpu_mb,
        "calibration_examples": min(spec.sparse.calibration.examples, len(setup.train_loader.dataset))
        if uses_calibration(spec) else 0,
        "folded_params": model.num_folded_params() if isinstance(model, SparseModel) else 0,
        "mask_updates": getattr(getattr(model, "method", None), "history", []),
        "adapter_bytes": adapter_bytes,
        "config": config,
    }
    metrics.update(run_metrics(spec, result))
    write_json(out / "metrics.json", metrics)
    return metrics


def _run_record(spec: RunSpec, setup: Setup) -> dict[str, Any]:
    """What ``eval`` needs to rebuild the model and data without being told again."""
    return {"model": spec.model, "task": setup.task_name, "max_length": spec.data.max_length,
            "data": asdict(spec.data), "seed": spec.training.seed, **setup.record}


def _save_adapter(model, spec: RunSpec, setup: Setup, folder: Path) -> int:
    """Write the adapter; returns its size in bytes. Full fine-tuning writes none (a whole
    model per run) and reports the size its trainable tensors would take."""
    record = _run_record(spec, setup)
    if spec.baseline is None:
        model.save_pretrained(folder, extra_metadata={"sparseft_run": record})
    else:
        written = model.save(folder)
        if spec.baseline.method == "full":
            return written
        write_json(folder / BASELINE_RECORD, {**record, "baseline": spec.baseline.to_dict()})
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _without_examples(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "examples"}


def run_metrics(spec: RunSpec, result) -> dict[str, Any]:
    """The training-side metrics: speed, memory, loss, environment."""
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
        "lr": result.lr if result.lr is not None else spec.training.lr,  # "auto" resolved
        "lr_given": spec.training.lr,  # as asked: a number, or "auto"
        "history": result.history,
        "training": asdict(spec.training),
        "data": asdict(spec.data),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        # which CPU SDDMM ran: sparseft's compiled kernel, or torch's (no C compiler)
        "cpu_sddmm": None if device.type == "cuda" else ("compiled" if native.library() is not None else "torch"),
    }


def adapter_record(adapter: str | os.PathLike) -> dict[str, Any]:
    """The run record an adapter folder keeps (model, task, data options, seed; a
    baseline's also its config under ``baseline``)."""
    sidecar = Path(adapter) / BASELINE_RECORD
    if sidecar.is_file():
        return json.loads(sidecar.read_text())
    meta, _ = read_adapter(adapter)
    return meta.get("sparseft_run", {})


def evaluate_adapter(adapter: str, opts: TaskOptions | None = None, model: str | None = None,
                     force: bool = False, seed: int | None = None, strict: bool = False) -> dict[str, Any]:
    """Re-score a saved adapter (sparse or baseline) on its task (or the one given);
    ``adapter`` may also be the run folder that holds it."""
    folder = Path(adapter)
    if not (folder / "adapter_config.json").exists() and (folder / run_folder.METRICS_NAME).is_file():
        if json.loads((folder / run_folder.METRICS_NAME).read_text()).get("method") == "full":
            raise ValueError(f"{folder} is a full fine-tuning run: it saves no adapter to evaluate")
        adapter = str(folder / ADAPTER)
    record = adapter_record(adapter)
    if opts is None:
        opts = task_options_from_dict(record["data"]) if record.get("data") else TaskOptions()
    seed = record.get("seed", 0) if seed is None else seed
    spec = RunSpec(out="", model=model or record.get("model", DEFAULT_MODEL), data=opts,
                   training=TrainingArguments(seed=seed))
    torch.manual_seed(seed)
    setup = prepare(spec)
    if "baseline" in record:
        tuned = load_baseline(setup.base, adapter)
    else:
        tuned = SparseModel.from_pretrained(setup.base, adapter, force=force, strict=strict)
    scores = {split: setup.evaluate(tuned, split) for split in ("validation", "test")}
    return {"adapter": str(adapter), "task": setup.task_name, "metric": setup.metric,
            "score": scores["test"][setup.metric], **scores}


write_json = run_folder.write_json
