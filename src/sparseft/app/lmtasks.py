"""Tasks for causal language models: language modelling (perplexity) and generation
(greedy decoding, exact match).

- ``bbc-lm``: BBC News articles (split by article, as ``bbc-topic``), cut into blocks of
  ``max_length`` tokens; the metric is held-out perplexity (lower is better).
- ``rt-gen``: Rotten Tomatoes snippets as an instruction ("... Answer with positive or
  negative."); the model must generate the word. Metric: exact match of the greedy
  continuation (case and surrounding punctuation ignored).
- ``bbc-gen``: the opening of a BBC News article with the question which of the five
  sections it comes from; the model must generate the section's name. Exact match, as
  ``rt-gen``.
- your own prompt/target pairs: ``--train-file/--eval-file`` with
  ``--prompt-column/--target-column`` (CSV, TSV or JSONL).

Prompts are wrapped in the tokenizer's chat template when it has one (SmolLM2-Instruct
does); the loss is taken on the target tokens (and the end-of-sequence token) only.
"""
from __future__ import annotations

import functools
import math
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import data
from .data import DataError
from .tasks import _subset, user_validation

LM_KINDS = ("lm", "generation")


@dataclass(frozen=True)
class Pair:
    prompt: str  # empty for plain language modelling
    target: str
    group: str


@dataclass
class LMTaskData:
    name: str
    kind: str  # "lm" or "generation"
    metric: str  # "perplexity" (lower is better) or "exact_match"
    train: list[Pair]
    validation: list[Pair]
    test: list[Pair]
    validation_source: str = "task split"  # as TaskData.validation_source

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "perplexity"


RT_PROMPT = "Review: {text}\nIs this movie review positive or negative? Answer with positive or negative."
RT_TARGETS = ("negative", "positive")  # label 0 = rotten, 1 = fresh


BBC_PROMPT = ("Article: {text}\nWhich section of BBC News is this article from: {sections}? "
              "Answer with one word.")
# The article's first characters only: with SmolLM2's chat template a prompt is then about
# 100 tokens and nearly always fits in 128; one too long loses its start, not the question.
BBC_PROMPT_CHARS = 200


def _bbc_pair(e: data.Example) -> Pair:
    return Pair("", e.text, e.group)


@functools.lru_cache(maxsize=1)
def _bbc_sections() -> tuple[str, ...]:
    return tuple(data.bbc_news_classes())  # read once, not for every article


def _bbc_topic_pair(e: data.Example) -> Pair:
    sections = _bbc_sections()
    text = " ".join(e.text.split())[:BBC_PROMPT_CHARS].rstrip()
    return Pair(BBC_PROMPT.format(text=text, sections=", ".join(sections[:-1]) + " or " + sections[-1]),
                sections[e.label], e.group)


def _rt_pair(e: data.Example) -> Pair:
    return Pair(RT_PROMPT.format(text=e.text), RT_TARGETS[e.label], e.group)


# name -> (kind, metric, examples loader, Example -> Pair, description)
LM_TASKS = {
    "bbc-lm": ("lm", "perplexity", data.load_bbc_news, _bbc_pair,
               "BBC News articles, causal LM, held-out perplexity"),
    "bbc-gen": ("generation", "exact_match", data.load_bbc_news, _bbc_topic_pair,
                "BBC News article openings; greedy answer (the section), exact match"),
    "rt-gen": ("generation", "exact_match", data.load_rotten_tomatoes, _rt_pair,
               "Rotten Tomatoes snippets as an instruction; greedy answer, exact match"),
}


def task_descriptions() -> dict[str, str]:
    """Every built-in task, classification and causal-LM, with a one-line description:
    the one list that --help and the unknown-task error show."""
    from .tasks import TASKS

    return {**{n: t.description for n, t in TASKS.items()},
            **{n: f"{entry[4]}; a causal LM: --model smollm2" for n, entry in LM_TASKS.items()}}


def is_lm_task(name: str | None) -> bool:
    return name in LM_TASKS


def get_lm_task(name: str, seed: int = 0, max_train_examples: int | None = None,
                max_eval_examples: int | None = None) -> LMTaskData:
    if name not in LM_TASKS:
        raise DataError(f"unknown causal-LM task {name!r}; known: {', '.join(sorted(LM_TASKS))}")
    kind, metric, load, convert, _ = LM_TASKS[name]
    # the same splits (and subsets) as the classification task on the same data
    splits = data.group_split(load(), seed)
    limits = {"train": max_train_examples, "validation": max_eval_examples, "test": max_eval_examples}
    parts = {split: [convert(e) for e in _subset(splits[split], limits[split], f"{seed}-{split}")] for split in limits}
    return LMTaskData(name=name, kind=kind, metric=metric, **parts)


def read_pairs(path: str | Path, prompt_column: str = "prompt", target_column: str = "target") -> list[Pair]:
    """A user's CSV/TSV/JSONL file of prompt/target rows; errors name the line and column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    pairs = [
        Pair(data._cell(path, line, record, prompt_column, "prompt"),
             data._cell(path, line, record, target_column, "target"), f"{path.name}:{line}")
        for line, record in data._read_records(path, (prompt_column, target_column))
    ]
    if not pairs:
        raise DataError(f"{path} has no data rows")
    return pairs


def generation_task_from_files(train_file: str | Path, eval_file: str | Path, prompt_column: str = "prompt",
                               target_column: str = "target", validation_file: str | Path | None = None,
                               validation_split: float = 0.0, seed: int = 0) -> LMTaskData:
    """A generation task from your own files; the eval file is the test split, validation
    as for classification (`tasks.task_from_files`)."""
    train = read_pairs(train_file, prompt_column, target_column)
    evaluation = read_pairs(eval_file, prompt_column, target_column)
    train, validation, source = user_validation(
        train, evaluation, validation_file and (lambda: read_pairs(validation_file, prompt_column, target_column)),
        validation_split, seed)
    return LMTaskData(Path(train_file).stem, "generation", "exact_match", train, validation, list(evaluation), source)


def majority_target_rate(pairs: Sequence[Pair]) -> float | None:
    """Exact match of always answering the most common target (None for plain LM)."""
    if not pairs or not pairs[0].prompt:
        return None
    counts = Counter(normalize_answer(p.target) for p in pairs)
    return max(counts.values()) / len(pairs)


# --------------------------------------------------------------------------- tokenization


def format_prompt(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    return prompt + "\n"


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_training(pairs: Sequence[Pair], tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) sequences. LM text is cut into blocks of ``max_length`` tokens
    (every token kept); a generation pair is prompt + target + eos with the loss on the
    target, its prompt cut from the left when the whole does not fit."""
    if max_length < 4:
        raise DataError(f"max_length must be at least 4, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no end-of-sequence token")
    out = []
    for pair in pairs:
        if not pair.prompt:
            ids = _ids(tokenizer, pair.target) + [eos]
            for start in range(0, len(ids) - 1, max_length):
                block = ids[start:start + max_length]
                if len(block) >= 2:
                    out.append((block, list(block)))
            continue
        prompt = _ids(tokenizer, format_prompt(tokenizer, pair.prompt))
        target = (_ids(tokenizer, pair.target) + [eos])[: max_length - 1]
        prompt = prompt[-(max_length - len(target)):]
        out.append((prompt + target, [-100] * len(prompt) + target))
    return out


class CausalCollator:
    def __init__(self, pad_id: int, left: bool = False):
        self.pad_id, self.left = pad_id, left

    def __call__(self, items):
        width = max(len(ids) for ids, _ in items)
        input_ids, labels, mask = [], [], []
        for ids, lab in items:
            pad = width - len(ids)
            if self.left:
                input_ids.append([self.pad_id] * pad + ids)
                labels.append([-100] * pad + lab)
                mask.append([0] * pad + [1] * len(ids))
            else:
                input_ids.append(ids + [self.pad_id] * pad)
                labels.append(lab + [-100] * pad)
                mask.append([1] * len(ids) + [0] * pad)
        return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(mask),
                "labels": torch.tensor(labels)}


def make_lm_loader(pairs: Sequence[Pair], tokenizer, batch_size: int, max_length: int, shuffle: bool = False,
                   seed: int = 0) -> DataLoader:
    encoded = encode_training(pairs, tokenizer, max_length)
    if not encoded:
        raise DataError("no training sequences (all examples empty?)")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(encoded, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=CausalCollator(tokenizer.pad_token_id))


# --------------------------------------------------------------------------- evaluation


def normalize_answer(text: str) -> str:
    """First line, whitespace collapsed, case folded, surrounding punctuation removed."""
    text = text.strip().split("\n")[0] if text.strip() else ""
    return " ".join(text.split()).casefold().strip(string.punctuation + " ")


# Logit elements one perplexity forward pass may produce (fp32: 4 bytes each).
EVAL_LOGITS_BUDGET = 2 ** 25


def _vocab_size(model) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "vocab_size", 0) or 50_000)


@torch.no_grad()
def evaluate_perplexity(model, loader) -> dict[str, float]:
    """exp(mean next-token negative log-likelihood) over every labelled token."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters(), torch.empty(0)).device
    try:
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            # A few sequences at a time: a large vocabulary's logits (and their log-softmax)
            # for a whole evaluation batch would dominate the run's peak memory.
            rows = max(1, EVAL_LOGITS_BUDGET // max(1, batch["input_ids"].shape[1] * _vocab_size(model)))
            for start in range(0, batch["input_ids"].shape[0], rows):
                part = {key: value[start:start + rows] for key, value in batch.items()}
                logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
                shift_logits = logits[:, :-1].float()
                shift_labels = part["labels"][:, 1:]
                total += F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                         ignore_index=-100, reduction="sum").item()
                count += int((shift_labels != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("no tokens to evaluate")
    loss = total / count
    return {"perplexity": math.exp(loss), "loss": loss, "tokens": count}


@torch.no_grad()
def evaluate_generation(model, pairs: Sequence[Pair], tokenizer, batch_size: int = 16, max_length: int = 128,
                        max_new_tokens: int = 8, keep_examples: int = 5) -> dict:
    """Greedy decoding; exact match of the normalised continuation against the target."""
    was_training = model.training
    model.eval()
    collate = CausalCollator(tokenizer.pad_token_id, left=True)
    device = next(model.parameters(), torch.empty(0)).device
    hits, samples = 0, []
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            prompts = [_ids(tokenizer, format_prompt(tokenizer, p.prompt))[-max_length:] for p in chunk]
            batch = {key: value.to(device) for key, value in collate([(ids, ids) for ids in prompts]).items()}
            generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for pair, text in zip(chunk, texts):
                ok = normalize_answer(text) == normalize_answer(pair.target)
                hits += ok
                if len(samples) < keep_examples:
                    samples.append({"target": pair.target, "generated": text, "match": bool(ok)})
    finally:
        model.train(was_training)
    if not pairs:
        raise DataError("no examples to evaluate")
    return {"exact_match": hits / len(pairs), "examples": samples}
