"""Everything a run needs before its method is applied, for classification and causal-LM
tasks alike: the task's data, the base model and tokenizer, the shuffled training loader,
the calibration batches and an ``evaluate(model, split)`` function."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from .lmtasks import (evaluate_generation, evaluate_perplexity, generation_task_from_files, get_lm_task, is_lm_task,
                      make_lm_loader, majority_target_rate)
from .data import DataError
from .guard_rails import with_progress
from .lmtasks import task_descriptions
from .pretrained import DEFAULT_MODEL, load_causal_lm, load_classifier
from .spec import RunSpec, TaskOptions
from .tasks import TaskData, evaluate_classifier, get_task, majority_rate, make_loader, task_from_files


@dataclass
class Setup:
    task_name: str
    metric: str
    higher_is_better: bool
    base: torch.nn.Module
    tokenizer: Any
    new_heads: list[str]  # freshly initialised task heads: trained densely (modules_to_save)
    train_loader: DataLoader
    evaluate: Callable[[torch.nn.Module, str], dict[str, Any]]  # (model, "validation" | "test") -> metrics
    majority_rate: float | None
    record: dict[str, Any]  # task facts an adapter keeps for ``eval`` (label names, task kind)
    # where the validation split came from and its size: {"source": one of
    # tasks.VALIDATION_SOURCES, "examples": N} (metrics.json "validation_data")
    validation_data: dict[str, Any]


def is_causal_run(opts: TaskOptions) -> bool:
    return is_lm_task(opts.task) or bool(opts.prompt_column)


def _check_files(opts: TaskOptions) -> bool:
    """Whether ``opts`` names the user's own files (checking that they go together)."""
    if opts.train_file or opts.eval_file:
        if not (opts.train_file and opts.eval_file):
            raise ValueError("--train-file and --eval-file go together")
        return True
    if opts.validation_file:
        raise ValueError("--validation-file is for your own data: give --train-file and --eval-file too")
    return False


def load_task(opts: TaskOptions, seed: int) -> TaskData:
    """A classification task: built in, or from the user's files."""
    if _check_files(opts):
        return task_from_files(opts.train_file, opts.eval_file, opts.text_column, opts.label_column,
                               validation_file=opts.validation_file, validation_split=opts.validation_split, seed=seed)
    if opts.task not in task_descriptions():
        raise DataError(f"unknown task {opts.task!r}; built-in tasks: {', '.join(task_descriptions())}; "
                        "or give your own data with --train-file/--eval-file")
    return get_task(opts.task, seed=seed, max_train_examples=opts.max_train_examples,
                    max_eval_examples=opts.max_eval_examples)


def prepare(spec: RunSpec) -> Setup:
    """Load ``spec``'s task and base model (in that order: the head's initialisation draws
    from torch's global generator after the task is loaded)."""
    return _prepare_causal(spec) if is_causal_run(spec.data) else _prepare_classification(spec)


def _prepare_classification(spec: RunSpec) -> Setup:
    opts, seed = spec.data, spec.training.seed
    task = load_task(opts, seed)
    base, tokenizer, new_heads = load_classifier(spec.model, task.num_labels)
    loader = make_loader(task.train, tokenizer, opts.batch_size, opts.max_length, shuffle=True, seed=seed)

    def evaluate(model, split):
        return evaluate_classifier(model, with_progress(
            make_loader(getattr(task, split), tokenizer, opts.eval_batch_size, opts.max_length), f"eval {split}",
            spec.training.progress))

    return Setup(task.name, task.metric, True, base, tokenizer, list(new_heads), loader, evaluate,
                 majority_rate(task.test), {"label_names": task.label_names}, _validation_data(task))


def _prepare_causal(spec: RunSpec) -> Setup:
    opts, seed = spec.data, spec.training.seed
    if spec.model == DEFAULT_MODEL:
        what = "generation data (--prompt-column)" if opts.prompt_column else f"--task {opts.task}"
        raise ValueError(f"{what} needs a causal LM and the default model is an encoder (MiniLM): "
                         "try --model smollm2, or a local causal-LM folder")
    if _check_files(opts):
        task = generation_task_from_files(opts.train_file, opts.eval_file, opts.prompt_column or "prompt",
                                          opts.target_column or "target", validation_file=opts.validation_file,
                                          validation_split=opts.validation_split, seed=seed)
    else:
        task = get_lm_task(opts.task, seed, opts.max_train_examples, opts.max_eval_examples)
    base, tokenizer = load_causal_lm(spec.model)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{task.name} needs a causal LM whose tokenizer has an end-of-sequence token; "
                         f"--model {spec.model} has none: try --model smollm2")
    loader = make_lm_loader(task.train, tokenizer, opts.batch_size, opts.max_length, shuffle=True, seed=seed)

    def evaluate(model, split):
        pairs = getattr(task, split)
        if task.kind == "lm":
            return evaluate_perplexity(model, with_progress(make_lm_loader(pairs, tokenizer, opts.eval_batch_size,
                                                                           opts.max_length), f"eval {split}",
                                                            spec.training.progress))
        return evaluate_generation(model, pairs, tokenizer, batch_size=opts.eval_batch_size,
                                   max_length=opts.max_length, max_new_tokens=opts.max_new_tokens)

    return Setup(task.name, task.metric, task.higher_is_better, base, tokenizer, [], loader, evaluate,
                 majority_target_rate(task.test), {"kind": task.kind}, _validation_data(task))


def _validation_data(task) -> dict[str, Any]:
    return {"source": task.validation_source, "examples": len(task.validation)}


def calibration_order(size: int, examples: int, seed: int) -> list[int]:
    """Which training examples calibrate, in order: the first ``examples`` of a seeded
    permutation of the training set (capped by its size). Every run, classification or
    causal LM, uses this one order."""
    n = min(examples, size)
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def calibration_batches(train_loader: DataLoader, examples: int, batch_size: int, seed: int) -> list[dict]:
    """The calibration examples (``calibration_order``) batched as training batches are,
    labels included, with the training loader's collate function, shortest first: each
    batch pads only to its own longest example, so the scorers' passes run over about half
    the tokens of a random batching on snippets of mixed length. The scores sum over the
    batches, so their grouping does not change what they measure (a classifier's mean
    gradient is the same for any grouping). The training loader's own shuffling generator
    is left untouched."""
    dataset = train_loader.dataset
    chosen = [dataset[i] for i in calibration_order(len(dataset), examples, seed)]
    collate = train_loader.collate_fn
    chosen.sort(key=lambda example: collate([example])["input_ids"].shape[-1])  # stable: ties keep the seeded order
    return list(DataLoader(chosen, batch_size=batch_size, collate_fn=collate))
