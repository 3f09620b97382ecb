"""``sparseft sweep grid.yaml``: methods x budgets x learning rates x seeds.

Each run is one ``sparseft train`` command line (in a fresh process by default, so peak
memory and timings are its own) writing ``<out>/<run>/metrics.json``; every finished run
is appended to ``<out>/results.jsonl``. A sweep resumes: runs whose metrics.json exists
are skipped (and added to results.jsonl if missing there), and a run stopped after a
checkpoint (``save_every`` in ``base``) continues from it (``sparseft train --resume``).

Grid file (YAML or JSON)::

    out: runs/rt-grid
    base:                      # any `sparseft train` option, by its long name
      task: rt-sentiment
      max_train_examples: 2000
      max_steps: 60
    methods: [random, lora, full]
    budgets:                   # as LoRA-rank equivalents and/or densities
      - match_lora_rank: 1
      - density: 0.01
    lrs: {random: [5e-3, 1e-2], lora: [5e-4], full: [5e-5]}   # or one list for all; omitted: method default
    seeds: [0, 1]
    variants:                  # optional: named sets of extra options, each run once per variant
      float: {}
      nf4: {quantize: nf4}
    isolate: true              # one process per run (default); false: runs in this process

``full`` fine-tuning has no budget and runs once per learning rate and seed. For LoRA
and SHiRA a ``match_lora_rank`` budget is the rank itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import latest_checkpoint
from .data import DataError
from .options import train_from_argv
from .runner import CHECKPOINTS, SPEC_NAME

BUDGET_KEYS = ("match_lora_rank", "density", "num_params")
NO_BUDGET = ("full",)
# each run prints a line every this many steps into its log.txt (a grid's base may set log_every)
SWEEP_LOG_EVERY = 10


class SweepError(ValueError):
    """Some runs of a sweep failed (the others are kept; re-running resumes)."""
DROP_FROM_RESULTS = ("history",)


@dataclass
class Run:
    name: str
    method: str
    budget: dict[str, Any]
    lr: float | None
    seed: int
    argv: list[str]
    variant: str | None = None


def load_grid(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"grid file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise DataError("reading a YAML grid needs pyyaml (pip install pyyaml), or write the grid as JSON") from None
        try:
            grid = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise DataError(f"{path}: not valid YAML ({err})") from None
    else:
        try:
            grid = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(grid, dict):
        raise DataError(f"{path}: a grid is a mapping (methods, budgets, lrs, seeds, base, out)")
    unknown = sorted(set(grid) - {"out", "base", "methods", "budgets", "lrs", "seeds", "variants", "isolate"})
    if unknown:
        raise DataError(f"{path}: unknown grid key(s) {unknown}")
    if "out" not in grid:
        grid["out"] = str(path.with_suffix(""))
    if not grid.get("methods"):
        raise DataError(f"{path}: 'methods' must list at least one method")
    for budget in grid.get("budgets") or []:
        if not (isinstance(budget, dict) and len(budget) == 1 and next(iter(budget)) in BUDGET_KEYS):
            raise DataError(f"{path}: each budget is one of {list(BUDGET_KEYS)} with a value, got {budget!r}")
    variants = grid.get("variants")
    if variants is not None and not (isinstance(variants, dict) and variants
                                      and all(isinstance(v, dict) or v is None for v in variants.values())):
        raise DataError(f"{path}: 'variants' maps each variant's name to its extra options, got {variants!r}")
    return grid


def _flag(key: str, value: Any) -> list[str]:
    flag = "--" + key.replace("_", "-")
    if value is True:
        return [flag]
    if value is False or value is None:
        return []
    return [flag, str(value)]


def _budget_label(budget: dict[str, Any]) -> str:
    if not budget:
        return "all"
    key, value = next(iter(budget.items()))
    return {"match_lora_rank": "r", "density": "d", "num_params": "n"}[key] + f"{value:g}"


def expand(grid: dict[str, Any]) -> list[Run]:
    base = dict(grid.get("base") or {})
    variants = {None if name is None else str(name): dict(opts or {})
                for name, opts in (grid.get("variants") or {None: {}}).items()}
    for where, options in [("base", base)] + [(f"variant {name!r}", opts) for name, opts in variants.items()]:
        for key in ("out", "method", "lr", "seed", *BUDGET_KEYS):
            if key in options:
                raise DataError(f"'{key}' belongs to the grid axes, not to {where}")
    budgets = grid.get("budgets") or [{}]
    seeds = grid.get("seeds") or [0]
    lrs = grid.get("lrs")
    out = Path(grid["out"])
    runs = []
    for method in grid["methods"]:
        method_lrs = lrs.get(method, [None]) if isinstance(lrs, dict) else (lrs or [None])
        method_budgets = [{}] if method in NO_BUDGET else budgets
        for budget in method_budgets:
            for lr in method_lrs:
                for seed in seeds:
                    for variant, extra in variants.items():
                        name = (f"{method}-{_budget_label(budget)}" + (f"-lr{lr:g}" if lr is not None else "")
                                + f"-s{seed}" + (f"-{variant}" if variant is not None else ""))
                        argv = ["train", "--out", str(out / name), "--method", method, "--seed", str(seed),
                                "--no-progress", "--log-every", str(SWEEP_LOG_EVERY)]
                        for key, value in budget.items():
                            argv += _flag(key, value)
                        if lr is not None:
                            argv += ["--lr", str(lr)]
                        for key, value in {**base, **extra}.items():
                            argv += _flag(key, value)
                        runs.append(Run(name, method, dict(budget), lr, seed, argv, variant))
    return runs


def _result_row(run: Run, metrics: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in metrics.items() if k not in DROP_FROM_RESULTS}
    row.update(run=run.name, budget=_budget_label(run.budget), budget_spec=run.budget, lr=metrics.get("lr"))
    if run.variant is not None:
        row["variant"] = run.variant
    return row


def run_sweep(grid_path: str | Path, dry_run: bool = False, log=print) -> Path:
    """Run (or resume) every run of the grid; returns the results.jsonl path."""
    grid = load_grid(grid_path)
    runs = expand(grid)
    out = Path(grid["out"])
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = set()
    if results.is_file():
        for line in results.read_text().splitlines():
            if line.strip():
                done.add(json.loads(line).get("run"))
    isolate = grid.get("isolate", True)
    failures = []
    for i, run in enumerate(runs, 1):
        metrics_path = out / run.name / "metrics.json"
        if metrics_path.is_file():
            state = "done"
        elif dry_run:
            log(f"[{i}/{len(runs)}] would run: sparseft {' '.join(run.argv)}")
            continue
        else:
            resume = _resume_argv(out / run.name)
            # Otherwise whatever the folder holds is an unfinished attempt at this very run: start it afresh.
            argv = resume or [*run.argv, "--overwrite"]
            log(f"[{i}/{len(runs)}] {run.name}" + (" (resuming from its newest checkpoint)" if resume else ""))
            code = _execute(argv, isolate, out / run.name, log)
            if code != 0 or not metrics_path.is_file():
                failures.append(run.name)
                log(f"  failed (exit {code}); see {out / run.name / 'log.txt'}" if isolate else f"  failed (exit {code})")
                continue
            state = "ran"
        if run.name not in done and not dry_run:  # a dry run writes nothing
            row = _result_row(run, json.loads(metrics_path.read_text()))
            with results.open("a") as fh:
                fh.write(json.dumps(row, sort_keys=True, default=float) + "\n")
            done.add(run.name)
            if state == "done":
                log(f"[{i}/{len(runs)}] {run.name}: found metrics.json, added to results.jsonl")
        elif state == "done" or dry_run:
            log(f"[{i}/{len(runs)}] {run.name}: done already, skipped")
    if failures:
        raise SweepError(f"{len(failures)} run(s) failed: {', '.join(failures)}; fix and re-run the sweep to resume")
    return results


def _resume_argv(folder: Path) -> list[str] | None:
    """``train --resume`` for a run that was stopped after a checkpoint (``save_every`` in
    the grid's ``base``); None when the run has to start over."""
    if (folder / SPEC_NAME).is_file() and latest_checkpoint(folder / CHECKPOINTS) is not None:
        return ["train", "--resume", str(folder)]
    return None


def _execute(argv: list[str], isolate: bool, folder: Path, log=print) -> int:
    """Run one ``train`` command line: in a child process (its output in ``log.txt``), or
    in this process (``isolate: false``); returns its exit status."""
    if not isolate:
        try:
            train_from_argv(argv)
        except SystemExit as stop:  # the parser refused the command line (it printed why)
            return stop.code if isinstance(stop.code, int) else 2
        except Exception as err:  # one failed run must not stop the others
            log(f"  error: {type(err).__name__}: {err}")
            return 2
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.txt", "a") as log:  # a resumed run's log follows its first part
        return subprocess.call([sys.executable, "-m", "sparseft.app.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                               env=os.environ.copy())
