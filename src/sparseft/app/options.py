"""The ``sparseft`` command line's options, and the run a ``train`` command line describes.

Kept apart from ``cli`` (which runs the commands) so that a sweep can turn its command
lines into runs in this process without importing the command-line entry point.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import __version__
from .. import registry
from ..config import (AUTO_MICRO_BATCH, DEFAULT_DENSITY, DROP_POLICIES, GRANULARITIES, QUANTIZE_FORMATS, CalibrationOptions, ConfigError,
                      DynamicOptions, GrowDropOptions, ID3Options, SparseConfig)
from ..train import TrainingArguments
from .baselines import BASELINE_METHODS, BaselineConfig
from .data import VALIDATION_CAP, VALIDATION_FRACTION
from .runner import DEFAULT_HEAD_LR, default_lr, resume_training, run_training
from .spec import RunSpec, TaskOptions

# The method options' defaults are the library's (config.py), so the CLI cannot drift from them.
_CALIB, _DYNAMIC, _ID3, _GROW_DROP = CalibrationOptions(), DynamicOptions(), ID3Options(), GrowDropOptions()

TRAIN_EXAMPLES = """examples:
  sparseft train --task rt-sentiment --method random --density 0.01 --out runs/x
  sparseft train --resume runs/x          # continue an interrupted run (Ctrl-C writes a checkpoint)
  sparseft train --task bbc-topic --method gradient --match-lora-rank 4 --epochs 3 --out runs/grad
  sparseft train --method lora --lora-rank 8 --out runs/lora8
  sparseft train --model smollm2 --task rt-gen --method random --match-lora-rank 4 --out runs/gen
  sparseft train --model smollm2 --task bbc-lm --match-lora-rank 8 --quantize nf4 --bf16 --gradient-checkpointing --out runs/q
  sparseft train --train-file train.csv --eval-file test.csv --text-column review --label-column sentiment --out runs/mine
"""

EPILOG = TRAIN_EXAMPLES.replace("examples:\n", "examples:\n  sparseft eval --adapter runs/x/adapter\n"
                                "  sparseft export --adapter runs/x/adapter --merged runs/x/merged   # a plain transformers model\n", 1) + \
    "  sparseft sweep grid.yaml && sparseft plot runs/grid/results.jsonl --out runs/grid/plots\n"

GRID_FORMAT = """grid file (YAML or JSON):
  out: runs/rt-grid            # runs and results.jsonl go here (default: the grid's path without suffix)
  base:                        # any `sparseft train` option by its long name, with _ for -
    task: rt-sentiment
    max_train_examples: 640
    max_steps: 40
  methods: [random, gradient, lora, full]
  budgets:                     # each one of match_lora_rank, density, num_params
    - match_lora_rank: 1
    - density: 0.01
  lrs: {random: [0.005, 0.02], lora: [0.003]}   # per method, or one list for all; omitted: the default
  seeds: [0, 1, 2]
  isolate: true                # each run in its own process (default)

Runs are named <method>-<budget>[-lr<rate>]-s<seed>; each writes <out>/<run>/metrics.json and is
appended to <out>/results.jsonl. Re-running the sweep skips finished runs. `full` takes no budget.
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """One default per option, shown only where there is one; required options say so."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required:
            text += " (required)"
        if ("default" not in text and action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


def _task_help() -> str:
    from .lmtasks import task_descriptions

    return "built-in task: " + "; ".join(f"{name} ({what})" for name, what in task_descriptions().items())


def _add_data_options(p: argparse.ArgumentParser, task_default: str | None, training: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--task", default=task_default,
                   help=_task_help() if training else _task_help() + ". Default: the task recorded in the adapter")
    g.add_argument("--train-file", help="your own training data (CSV, TSV or JSONL); needs --eval-file"
                   if training else "your own training data: its labels fix the label order (with --eval-file)")
    g.add_argument("--eval-file", help="your own test data (CSV, TSV or JSONL): the reported score")
    g.add_argument("--validation-file",
                   help="your own validation data (CSV, TSV or JSONL): what --eval-every and sweeps choose learning "
                        "rates on (default: carved out of --train-file, see --validation-split)")
    g.add_argument("--validation-split", type=float, default=VALIDATION_FRACTION, metavar="FRACTION",
                   help=f"your own data without --validation-file: hold out this fraction of the training rows "
                        f"(at most {VALIDATION_CAP:,}), drawn with --seed, as the validation split (default: "
                        f"{VALIDATION_FRACTION:g})")
    g.add_argument("--no-validation-split", dest="validation_split", action="store_const", const=0.0,
                   help="your own data: train on every training row and validate on the eval file, which is then "
                        "both validation and test (a rate chosen on it is chosen on the test data)")
    g.add_argument("--text-column", default="text", help="column holding the text")
    g.add_argument("--label-column", default="label", help="column holding the label")
    if training:
        g.add_argument("--max-train-examples", type=int, help="use a fixed, seeded subset of the training split")
    g.add_argument("--max-eval-examples", type=int, help="cap the validation and test splits")
    g.add_argument("--max-length", type=int, default=64, help="truncate inputs to this many tokens")
    if training:
        g.add_argument("--batch-size", type=int, default=32, help="training batch size")
    g.add_argument("--prompt-column", help="your own generation data: column holding the prompt (causal LMs)")
    g.add_argument("--target-column", help="your own generation data: column holding the target answer")
    g.add_argument("--max-new-tokens", type=int, default=8, help="generation tasks: tokens to decode greedily")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparseft", description="Sparse fine-tuning of transformer models: train a small subset of the model's own weights.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sparseft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune sparsely and write metrics.json and the adapter",
                       description="Fine-tune a model sparsely (or with a baseline) and write the run folder.",
                       epilog=TRAIN_EXAMPLES, formatter_class=HelpFormatter)
    t.add_argument("--out", help="run folder: gets metrics.json, run_spec.json, adapter/ and checkpoints/ "
                                 "(required, unless --resume)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run that --out holds (its metrics.json, run_spec.json, adapter/ and checkpoints/)")
    t.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its newest checkpoint, with its recorded settings")
    t.add_argument("--model", default="default",
                   help="'default' (the embedded all-MiniLM-L6-v2), 'smollm2' (SmolLM2-135M-Instruct, "
                        "converted once from its GGUF to a cache) or a local Hugging Face model folder")
    _add_data_options(t, "rt-sentiment", training=True)
    m = t.add_argument_group("sparse method")
    m.add_argument("--method", default="random", choices=[*registry.METHODS, *BASELINE_METHODS],
                   help="how entries are chosen. " + registry.methods_help() + ". Baselines: lora, full, shira, "
                        "supertuning (baselines.py). Table: docs/methods.md")
    m.add_argument("--lora-rank", type=int, help="rank for --method lora or shira (default 8, or from the budget)")
    budget = m.add_mutually_exclusive_group()
    budget.add_argument("--density", type=float, help=f"fraction of the targeted weights to train (default {DEFAULT_DENSITY})")
    budget.add_argument("--num-params", type=int, help="absolute number of trained entries")
    budget.add_argument("--match-lora-rank", type=int, help="as many entries as LoRA of this rank on the same targets")
    m.add_argument("--target-modules", default="all-linear",
                   help="'all-linear', a regex on module names, or comma-separated name suffixes")
    m.add_argument("--selection", default="global", choices=["global", "per-layer"], help="one top-k over all targets, or a share per layer")
    m.add_argument("--granularity", default="entry", choices=list(GRANULARITIES),
                   help="mask structure: single entries, or whole aligned 16x16 / 32x32 tiles (scores pooled by "
                        "tile mean; the budget still counts entries, rounded to whole tiles; see docs/gpu.md)")
    m.add_argument("--magnitude-order", default="largest", choices=["largest", "smallest"], help="for --method magnitude")
    m.add_argument("--calib-examples", type=int, default=_CALIB.examples,
                   help="calibration examples for the data-driven scorers (the first N of the training split in a seeded "
                        "order, capped by its size; causal LMs: training sequences)")
    m.add_argument("--calib-batch-size", type=int,
                   help="batch size of the calibration batches (default: --batch-size)")
    m.add_argument("--calib-micro-batch", type=_micro_batch, default=AUTO_MICRO_BATCH, metavar="N|auto",
                   help="examples per forward/backward pass while scoring: calibration batches are split into "
                        "micro-batches of at most this many examples, weighted to give the same gradient. auto: as "
                        "many as keep one micro-batch's activations within --calib-memory-mb, measured on one example "
                        "of the longest calibration batch (grasp: 1; fisher always uses 1). Selection memory is the "
                        "score buffers plus one micro-batch's activations (docs/scoring.md)")
    m.add_argument("--calib-memory-mb", type=float, default=_CALIB.memory_mb,
                   help="with --calib-micro-batch auto: the activations one micro-batch may keep for its backward "
                        "pass, in MiB")
    m.add_argument("--d3-epsilon", type=float, default=_ID3.d3_epsilon, help="epsilon of the d3 score |g|/(|w|+eps)^e (scorer d3 and id3)")
    m.add_argument("--d3-exponent", type=float, default=_ID3.d3_exponent, help="exponent e of the d3 score (0: d3 is |g|)")
    m.add_argument("--schedule", default="static", choices=list(registry.SCHEDULES),
                   help="; ".join(f"{name}: {text}" for name, text in registry.SCHEDULES.items()))
    m.add_argument("--update-every", type=int, default=_DYNAMIC.update_every, help="dynamic: optimizer steps between rescorings")
    m.add_argument("--score-window", type=int, default=_DYNAMIC.score_window,
                   help="dynamic and grow-drop: score from the dense gradients of this many steps before each "
                        "update (the other steps run the sparse path only)")
    m.add_argument("--drop-policy", default=_DYNAMIC.drop_policy, choices=list(DROP_POLICIES),
                   help="dynamic: fold dropped entries into the base weight (merge, recorded in the adapter) or discard them")
    m.add_argument("--quantize", choices=list(QUANTIZE_FORMATS),
                   help="keep the targeted layers' frozen weights quantized (bitsandbytes): nf4 (4-bit) or int8; the "
                        "trained values stay in float. With --method lora this is QLoRA. Not with dst or full")
    m.add_argument("--train-bias", action="store_true", help="also train the biases of targeted layers (densely)")
    m.add_argument("--unmask-every", type=int, default=_ID3.unmask_every,
                   help="id3: unmask every K optimizer steps (same total budget; fewer dense-gradient steps)")
    m.add_argument("--grow-drop-every", type=int, default=_GROW_DROP.every, help="grow-drop: swap entries every N steps")
    m.add_argument("--grow-drop-fraction", type=float, default=_GROW_DROP.fraction,
                   help="grow-drop: fraction swapped at the start, decaying (cosine) to 0")
    o = t.add_argument_group("optimisation")
    o.add_argument("--lr", type=float,
                   help="learning rate of the sparse values (default: a rule by method, budget and model size, larger "
                        "for smaller budgets, see docs/defaults.md; baselines: lora 5e-4, full 5e-5, shira and "
                        "supertuning 5e-3)")
    o.add_argument("--head-lr", type=float, help="learning rate of the new task head (default: 2e-3)")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on the sparse values")
    o.add_argument("--epochs", type=float, default=1.0, help="passes over the training data")
    o.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--warmup-ratio", type=float, default=0.06, help="fraction of steps with linear warmup")
    o.add_argument("--eval-every", type=int, default=0, help="evaluate on the validation split every N steps (0: at the end)")
    o.add_argument("--seed", type=int, default=0, help="seeds the mask, the data order and the head")
    o.add_argument("--save-every", type=int, default=0, help="also write a resumable checkpoint every N steps (0: off)")
    o.add_argument("--save-minutes", type=float, default=10.0,
                   help="write a resumable checkpoint when this many minutes have passed since the last one (0: off); "
                        "Ctrl-C (SIGINT) and SIGTERM always write one before stopping")
    o.add_argument("--keep-checkpoints", type=int, default=3, help="how many of the newest checkpoints to keep")
    o.add_argument("--skip-nonfinite", action="store_true",
                   help="skip and count steps whose loss or gradients are NaN/inf, instead of stopping")
    o.add_argument("--bf16", action="store_true",
                   help="train under bfloat16 autocast: the training forward's matmuls run in bf16; the trained "
                        "parameters, their gradients and the optimizer state stay float32. Selection (calibration) "
                        "and evaluation run in float32. On the CPU or a GPU with bf16 support")
    o.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer's activations in the backward pass instead of keeping them "
                        "(non-reentrant activation checkpointing of the model's layers): less memory, one more "
                        "forward pass a step. Training only, not selection")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--log-every", type=int, default=0, metavar="N",
                   help="also print a line (step, loss, seconds a step, time left) every N steps, for logs "
                        "where a progress bar does not read; sweeps use 10 (default: 0, off)")
    o.add_argument("--device", default="auto", help="where to train: cpu, cuda, cuda:N, or auto (CUDA when present, else the CPU)")

    e = sub.add_parser("eval", help="re-score a saved adapter",
                       description="Re-score an adapter that 'sparseft train' wrote (sparse or baseline) on its task, "
                                   "or on the task or files given.",
                       epilog="examples:\n  sparseft eval --adapter runs/x/adapter\n"
                              "  sparseft eval --adapter runs/x --task bbc-topic --max-eval-examples 200\n",
                       formatter_class=HelpFormatter)
    e.add_argument("--adapter", required=True, help="an adapter folder written by 'sparseft train', or its run folder")
    e.add_argument("--model", help="base model folder (default: the one recorded in the adapter)")
    e.add_argument("--force", action="store_true", help="load even if the adapter was made for another base model")
    e.add_argument("--strict", action="store_true",
                   help="refuse an adapter trained on other base weights (by default: a warning)")
    _add_data_options(e, None, training=False)
    e.add_argument("--seed", type=int, help="data split seed (default: the one recorded in the adapter)")

    x = sub.add_parser("export", help="write an adapter as a plain transformers model or a peft adapter",
                       formatter_class=HelpFormatter)
    x.add_argument("--adapter", required=True, help="an adapter folder written by 'sparseft train'")
    x.add_argument("--merged", help="folder for the base model with the deltas merged in (AutoModel loads it)")
    x.add_argument("--peft", help="folder for a peft Super-Tuning adapter (peft.PeftModel loads it; nn.Linear targets only)")
    x.add_argument("--model", help="base model folder (default: the one recorded in the adapter)")
    x.add_argument("--force", action="store_true", help="load even if the adapter was made for another base model")

    sw = sub.add_parser("sweep", help="run a grid of methods x budgets x learning rates x seeds (resumes)",
                        description="Run every combination of a grid file's methods, budgets, learning rates and "
                                    "seeds, one 'sparseft train' each.",
                        epilog=GRID_FORMAT, formatter_class=HelpFormatter)
    sw.add_argument("grid", help="grid file (YAML or JSON), format below")
    sw.add_argument("--dry-run", action="store_true", help="list the runs still to do, run nothing")

    pl = sub.add_parser("plot", help="score vs trainable parameters and cost bars (PNG) from a results.jsonl",
                        formatter_class=HelpFormatter)
    pl.add_argument("results", help="results.jsonl written by 'sparseft sweep'")
    pl.add_argument("--out", required=True, help="folder for the PNGs and summary.md")
    pl.add_argument("--grid", help="only the runs of this grid file (e.g. leave out a learning-rate sweep)")
    return parser


def task_options(ns: argparse.Namespace) -> TaskOptions:
    return TaskOptions(
        task=ns.task or "rt-sentiment", train_file=ns.train_file, eval_file=ns.eval_file,
        validation_file=ns.validation_file, validation_split=ns.validation_split,
        text_column=ns.text_column, label_column=ns.label_column,
        max_train_examples=getattr(ns, "max_train_examples", None), max_eval_examples=ns.max_eval_examples,
        max_length=ns.max_length, batch_size=getattr(ns, "batch_size", 32),
        prompt_column=ns.prompt_column, target_column=ns.target_column, max_new_tokens=ns.max_new_tokens,
        calib_batch_size=getattr(ns, "calib_batch_size", None),
    )


def _micro_batch(value: str) -> int | str:
    """``--calib-micro-batch``: 'auto' or a number (checked by CalibrationOptions)."""
    if value == AUTO_MICRO_BATCH:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


def _targets(value: str):
    if value == "all-linear" or "," not in value and any(c in value for c in "^$*+?[](){}|\\"):
        return value
    return [v.strip() for v in value.split(",") if v.strip()]


def spec_from_args(ns: argparse.Namespace) -> RunSpec:
    """The run a parsed ``train`` command line describes (not ``--resume``)."""
    if not ns.out:
        raise ValueError("--out is required (or --resume RUN_DIR)")
    baseline = None
    density, num_params, match_lora_rank = ns.density, ns.num_params, ns.match_lora_rank
    if ns.method in BASELINE_METHODS:
        baseline = BaselineConfig(method=ns.method, lora_rank=ns.lora_rank, density=density, num_params=num_params,
                                  match_lora_rank=match_lora_rank, target_modules=_targets(ns.target_modules),
                                  seed=ns.seed, quantize=ns.quantize)
        density = num_params = match_lora_rank = None
    elif ns.lora_rank is not None:
        raise ConfigError("--lora-rank is for --method lora or shira; sparse methods take --match-lora-rank")
    sparse = SparseConfig(
        method="random" if baseline else ns.method, density=density, num_params=num_params, match_lora_rank=match_lora_rank,
        target_modules=_targets(ns.target_modules), selection=ns.selection, granularity=ns.granularity,
        magnitude_order=ns.magnitude_order, seed=ns.seed, train_bias=ns.train_bias,
        schedule=ns.schedule,
        calibration=CalibrationOptions(examples=ns.calib_examples, micro_batch=ns.calib_micro_batch,
                                       memory_mb=ns.calib_memory_mb),
        dynamic=DynamicOptions(update_every=ns.update_every, score_window=ns.score_window, drop_policy=ns.drop_policy),
        id3=ID3Options(unmask_every=ns.unmask_every, d3_epsilon=ns.d3_epsilon, d3_exponent=ns.d3_exponent),
        grow_drop=GrowDropOptions(every=ns.grow_drop_every, fraction=ns.grow_drop_fraction, score_window=ns.score_window),
        quantize=None if baseline else ns.quantize,
    )
    training = TrainingArguments(
        lr=ns.lr or default_lr(ns.method), head_lr=ns.head_lr or DEFAULT_HEAD_LR, weight_decay=ns.weight_decay,
        epochs=ns.epochs, max_steps=ns.max_steps, grad_accum=ns.grad_accum, warmup_ratio=ns.warmup_ratio,
        eval_every=ns.eval_every, seed=ns.seed, progress=not ns.no_progress, log_every=ns.log_every,
        save_every=ns.save_every, save_minutes=ns.save_minutes, keep_checkpoints=ns.keep_checkpoints,
        skip_nonfinite=ns.skip_nonfinite, bf16=ns.bf16, gradient_checkpointing=ns.gradient_checkpointing,
    )
    return RunSpec(out=ns.out, model=ns.model, data=task_options(ns), sparse=sparse, training=training,
                   baseline=baseline, device=ns.device)


def train_from_args(ns: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Run a parsed ``train`` command line (a new run, or ``--resume RUN_DIR``); returns
    the run's metrics and its folder."""
    if ns.resume:
        if ns.out and Path(ns.out) != Path(ns.resume):
            raise ValueError("--resume RUN_DIR continues that run in its own folder; leave out --out")
        return resume_training(ns.resume), ns.resume
    return run_training(spec_from_args(ns), overwrite=ns.overwrite), ns.out


def train_from_argv(argv: list[str]) -> tuple[dict[str, Any], str]:
    """``sparseft train ...`` in this process: ``argv`` starts with ``train``."""
    ns = build_parser().parse_args(argv)
    if ns.command != "train":
        raise ValueError(f"not a train command line: {' '.join(argv)}")
    return train_from_args(ns)
