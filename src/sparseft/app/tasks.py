"""Classification tasks: definitions, tokenized batches, metrics and evaluation."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import data
from .data import DataError, Example


# Where a task's validation split comes from: the built-in task's own split, the user's
# --validation-file, rows carved out of the user's training file, or (--no-validation-split)
# the user's eval file, which then also serves as the test split.
VALIDATION_SOURCES = ("task split", "file", "carved from train", "eval file")


@dataclass
class TaskData:
    name: str
    label_names: list[str]
    metric: str  # the primary metric, a key of classification_metrics()
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    validation_source: str = VALIDATION_SOURCES[0]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class TaskSpec:
    load: Callable[[], tuple[list[Example], list[str]]]  # -> (examples, label names)
    metric: str
    description: str


TASKS: dict[str, TaskSpec] = {
    "rt-sentiment": TaskSpec(
        load=lambda: (data.load_rotten_tomatoes(), list(data.RT_LABEL_NAMES)),
        metric="accuracy",
        description="Rotten Tomatoes snippets, fresh vs rotten, split by movie",
    ),
    "bbc-topic": TaskSpec(
        load=lambda: (data.load_bbc_news(), data.bbc_news_classes()),
        metric="accuracy",  # macro_f1 is reported too
        description="BBC News articles, 5 topics",
    ),
}


def get_task(
    name: str,
    seed: int = 0,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
) -> TaskData:
    """Load a registered task, split by group with `seed`, optionally subsampled.

    `max_eval_examples` caps validation and test each. Subsets are deterministic for a
    seed and keep the split's order.
    """
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    spec = TASKS[name]
    examples, label_names = spec.load()
    splits = data.group_split(examples, seed)
    return TaskData(
        name=name,
        label_names=label_names,
        metric=spec.metric,
        train=_subset(splits["train"], max_train_examples, f"{seed}-train"),
        validation=_subset(splits["validation"], max_eval_examples, f"{seed}-validation"),
        test=_subset(splits["test"], max_eval_examples, f"{seed}-test"),
    )


def task_from_files(
    train_file: str | Path,
    eval_file: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    name: str | None = None,
    validation_file: str | Path | None = None,
    validation_split: float = 0.0,
    seed: int = 0,
) -> TaskData:
    """A task from the user's own CSV/TSV/JSONL files; the eval file is the test split.

    Validation comes from `validation_file`, else from a `validation_split` fraction of
    the training rows (`data.carve_validation`, seeded), else (0) from the eval file.
    Label indexes come from the training file, so all files share one mapping.
    """
    train, label_names = data.read_table(train_file, text_column, label_column)
    evaluation, _ = data.read_table(eval_file, text_column, label_column, label_names=label_names)
    train, validation, source = user_validation(
        train, evaluation, validation_file and (lambda: data.read_table(
            validation_file, text_column, label_column, label_names=label_names)[0]), validation_split, seed)
    return TaskData(
        name=name or Path(train_file).stem,
        label_names=label_names,
        metric="accuracy",
        train=train,
        validation=validation,
        test=list(evaluation),
        validation_source=source,
    )


def user_validation(train: list, evaluation: list, read_validation: Callable[[], list] | None,
                    validation_split: float, seed: int) -> tuple[list, list, str]:
    """(train, validation, source) for the user's own files: see `task_from_files`."""
    if read_validation is not None:
        return train, read_validation(), "file"
    if validation_split:
        train, validation = data.carve_validation(train, validation_split, seed)
        return train, validation, "carved from train"
    return train, list(evaluation), "eval file"


def _subset(examples: list[Example], limit: int | None, seed: str) -> list[Example]:
    if limit is None or limit >= len(examples):
        return examples
    if limit < 1:
        raise DataError(f"an example limit must be a positive integer, got {limit}")
    # A string seed keeps train/validation/test draws independent yet reproducible.
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


# --------------------------------------------------------------------------- batching


class ClassificationCollator:
    """Tokenizes a list of Examples into a padded batch (padding per batch, truncated)."""

    def __init__(self, tokenizer, max_length: int = 64):
        if tokenizer.pad_token is None:
            raise DataError(
                "the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token "
                "(and model.config.pad_token_id to match) before batching"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            [example.text for example in examples],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        # Only these three keys: token_type_ids would break model(**batch) for decoder models.
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": torch.tensor([example.label for example in examples], dtype=torch.long),
        }


def make_loader(
    examples: Sequence[Example],
    tokenizer,
    batch_size: int,
    max_length: int = 64,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader of tokenized batches; with `shuffle`, the order is fixed by `seed`."""
    if not examples:
        raise DataError("cannot build a data loader from zero examples")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        list(examples),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=ClassificationCollator(tokenizer, max_length),
    )


# --------------------------------------------------------------------------- metrics


def classification_metrics(predictions, labels, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 of integer predictions against integer labels.

    Macro-F1 averages over the classes that occur in the labels or the predictions
    (as scikit-learn does by default), so a small evaluation set missing a class is
    not penalised for it.
    """
    predictions = _as_int_array(predictions)
    labels = _as_int_array(labels)
    if predictions.shape != labels.shape:
        raise DataError(f"{predictions.shape[0]} predictions but {labels.shape[0]} labels")
    if labels.size == 0:
        raise DataError("cannot compute metrics on zero examples")
    for kind, values in (("prediction", predictions), ("label", labels)):
        if values.min() < 0 or values.max() >= num_labels:
            raise DataError(f"a {kind} lies outside 0..{num_labels - 1}")

    confusion = np.bincount(labels * num_labels + predictions, minlength=num_labels**2)
    confusion = confusion.reshape(num_labels, num_labels)  # rows: label, columns: prediction
    true_positive = np.diag(confusion)
    false_positive = confusion.sum(axis=0) - true_positive
    false_negative = confusion.sum(axis=1) - true_positive
    denominator = 2 * true_positive + false_positive + false_negative
    present = denominator > 0
    f1 = 2 * true_positive[present] / denominator[present]
    return {
        "accuracy": float(true_positive.sum() / labels.size),
        "macro_f1": float(f1.mean()),
    }


def _as_int_array(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64).reshape(-1)


def majority_rate(examples: Sequence[Example]) -> float:
    """Fraction of the most common label: the accuracy of always guessing it."""
    if not examples:
        raise DataError("majority_rate of zero examples")
    counts = Counter(example.label for example in examples)
    return max(counts.values()) / len(examples)


def evaluate_classifier(model: torch.nn.Module, loader, device=None) -> dict[str, float]:
    """Metrics plus mean cross-entropy `loss` of `model` over `loader` (on the model's
    device unless `device` says otherwise).

    Runs in eval mode without gradients and restores the model's previous mode.
    """
    device = device or next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    total_loss = 0.0
    all_predictions, all_labels = [], []
    try:
        with torch.no_grad():
            for batch in loader:
                batch = {key: value.to(device) for key, value in batch.items()}
                logits = model(**batch).logits.float()
                total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
                all_predictions.append(logits.argmax(dim=-1).cpu())
                all_labels.append(batch["labels"].cpu())
    finally:
        model.train(was_training)
    if not all_labels:
        raise DataError("the evaluation loader yielded no batches")
    labels = torch.cat(all_labels)
    metrics = classification_metrics(torch.cat(all_predictions), labels, logits.shape[-1])
    metrics["loss"] = total_loss / labels.numel()
    return metrics
