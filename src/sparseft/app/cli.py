"""The ``sparseft`` command: train and evaluate sparse fine-tunes offline."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..model import AdapterError
from ..train import TrainingInterrupted
from .data import DataError
from .options import build_parser, task_options, train_from_args
from .plot import plot_results
from .run_folder import RunFolderError, resume_command
from .runner import evaluate_adapter
from .sweep import run_sweep

__all__ = ["build_parser", "main"]


def cmd_train(ns: argparse.Namespace) -> int:
    metrics, run_dir = train_from_args(ns)
    return _report(metrics, run_dir)


def _report(metrics: dict, out: str) -> int:
    majority = f"majority {metrics['majority_rate']:.4f}, " if metrics.get("majority_rate") is not None else ""
    print(f"{metrics['task']}: test {metrics['metric']} {metrics['score']:.4f} "
          f"({majority}validation {metrics['validation_score']:.4f}) | "
          f"{metrics['trainable_params']:,} trainable + {metrics['head_params']:,} head params | "
          f"{metrics['steps']} steps, {metrics['step_time_s'] * 1000:.0f} ms/step on {metrics.get('device', 'cpu')} | "
          f"wrote {out}/metrics.json")
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    explicit = ns.task or ns.train_file or ns.eval_file
    result = evaluate_adapter(ns.adapter, task_options(ns) if explicit else None, model=ns.model, force=ns.force, seed=ns.seed,
                              strict=ns.strict)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from .exporting import export_adapter

    for path in export_adapter(ns.adapter, merged=ns.merged, peft=ns.peft, model=ns.model, force=ns.force):
        print(f"wrote {path}")
    return 0


def cmd_sweep(ns: argparse.Namespace) -> int:
    results = run_sweep(ns.grid, dry_run=ns.dry_run)
    print(f"results: {results}")
    return 0


def cmd_plot(ns: argparse.Namespace) -> int:
    for path in plot_results(ns.results, ns.out, grid=ns.grid):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    handlers = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "sweep": cmd_sweep, "plot": cmd_plot}
    try:
        return handlers[ns.command](ns)
    except (ConfigError, AdapterError, DataError, ValueError, FileNotFoundError, FloatingPointError, CheckpointError,
            RunFolderError) as err:
        print(f"sparseft {ns.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"sparseft {ns.command}: interrupted after step {stop.step} of {stop.total}", file=sys.stderr)
        if stop.checkpoint:
            run_dir = Path(stop.checkpoint).parent.parent
            print(f"checkpoint written: {stop.checkpoint}\ncontinue with: {resume_command(run_dir)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"sparseft {ns.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
