"""What ``sparseft train`` tells the user before and during a run: plans too short to
learn anything, calibration about to start, progress of the evaluation passes."""
from __future__ import annotations

import sys
from collections import Counter
from typing import Any, Iterable

from tqdm.auto import tqdm

MIN_STEPS = 50  # fewer planned optimizer steps than this rarely leave the majority class
MIN_PER_CLASS = 20


def short_run_warnings(steps: int, training: Any, labels: Iterable[Any] | None = None,
                       label_names: list[str] | None = None) -> list[str]:
    """Warnings for a planned run too short to learn much; ``training`` is the run's
    TrainingArguments, ``labels`` the training examples' labels (classification)."""
    found = []
    if training.max_steps is None and steps < MIN_STEPS:
        more = max(2, -(-MIN_STEPS * training.epochs // steps))
        found.append(f"only {steps} optimizer steps are planned ({training.epochs:g} epoch(s)); runs this short often "
                     f"end at the majority class: try --epochs {more:g}, or more data")
    if labels is not None:
        counts = Counter(labels)
        rare = sorted((n, label) for label, n in counts.items() if n < MIN_PER_CLASS)
        if rare:
            named = ", ".join(f"{label_names[label] if label_names else label}: {n}" for n, label in rare[:5])
            found.append(f"few training examples for some classes ({named}); expect noisy scores, and consider "
                         "more data or more --epochs")
    return found


def warn(messages: list[str]) -> None:
    for message in messages:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def announce_calibration(method: str, examples: int, batches: int) -> None:
    print(f"calibrating: scoring entries with '{method}' on {examples} training examples ({batches} batches); "
          "this can take a while before training starts", file=sys.stderr, flush=True)


def with_progress(loader: Iterable, desc: str, enabled: bool) -> Iterable:
    """``loader`` with a transient progress bar (none when ``enabled`` is False)."""
    total = len(loader) if hasattr(loader, "__len__") else None
    return tqdm(loader, desc=desc, total=total, leave=False, disable=not enabled, dynamic_ncols=True)
