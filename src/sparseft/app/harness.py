"""The shared experiment harness behind ``runner.run_training`` for baselines (LoRA, full
fine-tuning, SHiRA, Super-Tuning) and for causal-LM tasks (``bbc-lm``, ``rt-gen``, your
own prompt/target files). Same data, same loop (``train.train``), same metrics.json
fields as a sparse classification run.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..model import get_sparse_model
from ..train import train


@dataclass
class Setup:
    task_name: str
    metric: str
    higher_is_better: bool
    base: torch.nn.Module
    tokenizer: Any
    new_heads: list[str]
    train_loader: Any
    evaluate: Callable[[torch.nn.Module, str], dict[str, Any]]  # (model, split) -> metrics
    majority_rate: float | None
    record: dict[str, Any]


def is_causal_run(spec) -> bool:
    from .lmtasks import is_lm_task

    d = spec.data
    return is_lm_task(d.task) or bool(getattr(d, "prompt_column", None))


def prepare(spec) -> Setup:
    from .runner import load_task

    opts, seed = spec.data, spec.training.seed
    if is_causal_run(spec):
        return _prepare_causal(spec)
    from .pretrained import load_classifier
    from .tasks import evaluate_classifier, majority_rate, make_loader

    task = load_task(opts, seed)
    base, tokenizer, new_heads = load_classifier(spec.model, task.num_labels)
    loader = make_loader(task.train, tokenizer, opts.batch_size, opts.max_length, shuffle=True, seed=seed)

    def evaluate(model, split):
        return evaluate_classifier(model, make_loader(getattr(task, split), tokenizer, opts.eval_batch_size,
                                                      opts.max_length))

    return Setup(task.name, task.metric, True, base, tokenizer, new_heads, loader, evaluate,
                 majority_rate(task.test), {"label_names": task.label_names})


def _prepare_causal(spec) -> Setup:
    from .lmtasks import (evaluate_generation, evaluate_perplexity, generation_task_from_files, get_lm_task,
                          make_lm_loader, majority_target_rate)
    from .pretrained import load_causal_lm

    opts, seed = spec.data, spec.training.seed
    if opts.train_file or opts.eval_file:
        if not (opts.train_file and opts.eval_file):
            raise ValueError("--train-file and --eval-file go together")
        task = generation_task_from_files(opts.train_file, opts.eval_file, opts.prompt_column or "prompt",
                                          opts.target_column or "target")
    else:
        task = get_lm_task(opts.task, seed, opts.max_train_examples, opts.max_eval_examples)
    base, tokenizer = load_causal_lm(spec.model)
    loader = make_lm_loader(task.train, tokenizer, opts.batch_size, opts.max_length, shuffle=True, seed=seed)

    def evaluate(model, split):
        pairs = getattr(task, split)
        if task.kind == "lm":
            return evaluate_perplexity(model, make_lm_loader(pairs, tokenizer, opts.eval_batch_size, opts.max_length))
        return evaluate_generation(model, pairs, tokenizer, batch_size=opts.eval_batch_size,
                                   max_length=opts.max_length, max_new_tokens=opts.max_new_tokens)

    return Setup(task.name, task.metric, task.higher_is_better, base, tokenizer, [], loader, evaluate,
                 majority_target_rate(task.test), {"kind": task.kind})


def _calibration(train_loader, spec) -> list[dict] | None:
    """The first ``calib_examples`` training examples, batched like training (the training
    loader's own shuffling generator is left untouched)."""
    from torch.utils.data import DataLoader

    from ..config import CALIBRATION_METHODS

    if spec.sparse.method not in CALIBRATION_METHODS:
        return None
    dataset = train_loader.dataset
    n = min(spec.sparse.calib_examples, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(n))
    batch = spec.data.calib_batch_size or spec.data.batch_size
    return list(DataLoader(subset, batch_size=batch, collate_fn=train_loader.collate_fn))


def run_experiment(spec) -> dict[str, Any]:
    """Train ``spec`` (a runner.RunSpec, sparse or baseline) and write ``<out>/metrics.json``."""
    from .runner import run_metrics, write_json

    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    seed = spec.training.seed
    torch.manual_seed(seed)
    setup = prepare(spec)
    from .runner import resolve_device

    setup.base.to(resolve_device(spec.device))
    select_start = time.perf_counter()
    baseline = getattr(spec, "baseline", None)
    if baseline is not None:
        from .baselines import get_baseline_model

        if not baseline.modules_to_save:
            baseline.modules_to_save = list(setup.new_heads)
        model = get_baseline_model(setup.base, baseline)
        optimizer = model.create_optimizer(spec.training.lr, spec.training.weight_decay, spec.training.head_lr)
        method, config = baseline.method, {**baseline.to_dict(), **model.info}
    else:
        if not spec.sparse.modules_to_save:
            spec.sparse.modules_to_save = list(setup.new_heads)
        model = get_sparse_model(setup.base, spec.sparse, calibration_data=_calibration(setup.train_loader, spec))
        optimizer, method, config = None, spec.sparse.method, spec.sparse.to_dict()
    select_seconds = time.perf_counter() - select_start
    result = train(model, setup.train_loader, spec.training, optimizer=optimizer,
                   eval_fn=lambda: _plain(setup.evaluate(model, "validation")))
    scores = {split: setup.evaluate(model, split) for split in ("validation", "test")}
    adapter_dir = out / "adapter"
    if baseline is not None:
        adapter_bytes = model.save(adapter_dir)
    else:
        model.save_pretrained(adapter_dir, extra_metadata={"sparseft_run": {
            "model": spec.model, "task": setup.task_name, "max_length": spec.data.max_length,
            "data": asdict(spec.data), "seed": seed, **setup.record}})
        adapter_bytes = sum(f.stat().st_size for f in adapter_dir.iterdir())
    summary = model.trainable_summary()
    metrics = {
        "task": setup.task_name,
        "method": method,
        "model": spec.model,
        "metric": setup.metric,
        "higher_is_better": setup.higher_is_better,
        "score": scores["test"][setup.metric],
        "validation_score": scores["validation"][setup.metric],
        "test": scores["test"],
        "validation": scores["validation"],
        "majority_rate": setup.majority_rate,
        "trainable_params": summary["sparse_params"],
        "head_params": summary["head_params"],
        "targeted_weights": summary["targeted_weights"],
        "density": summary["density"],
        "selection_seconds": select_seconds,
        "adapter_bytes": adapter_bytes,
        "config": config,
    }
    metrics.update(run_metrics(spec, result))
    write_json(out / "metrics.json", metrics)
    return metrics


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "examples"}


def evaluate_causal_adapter(adapter: str, opts, model: str, force: bool, seed: int) -> dict[str, Any]:
    """Re-score a sparse adapter trained on a causal-LM task."""
    from ..model import SparseModel
    from .runner import RunSpec
    from ..train import TrainingArguments

    setup = _prepare_causal(RunSpec(out="", model=model, data=opts, training=TrainingArguments(seed=seed)))
    sparse = SparseModel.from_pretrained(setup.base, adapter, force=force)
    scores = {split: setup.evaluate(sparse, split) for split in ("validation", "test")}
    return {"adapter": str(adapter), "task": setup.task_name, "metric": setup.metric,
            "score": scores["test"][setup.metric], **scores}
