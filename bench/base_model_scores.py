"""Score the base model, before any fine-tuning, on a task's validation and test splits.

The reference line for a results table: what the pretrained model scores with the same
data options and split seed as the runs of a sweep (e.g. SmolLM2's perplexity on
held-out BBC articles before it is tuned on any). Classification tasks get a freshly
initialised head, so their base score is chance; use the majority rate there instead.

    python bench/base_model_scores.py --model smollm2 --task bbc-lm --max-train-examples 96 \
        --max-eval-examples 10 --max-length 64 --seeds 0,1 --out docs/results/bbc-lm/base_model.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparseft.app.prepare import prepare
from sparseft.app.spec import RunSpec, TaskOptions
from sparseft.train import TrainingArguments


def base_scores(model: str, opts: TaskOptions, seed: int) -> dict:
    torch.manual_seed(seed)
    setup = prepare(RunSpec(out="", model=model, data=opts, training=TrainingArguments(seed=seed)))
    setup.base.eval()
    scores = {split: setup.evaluate(setup.base, split) for split in ("validation", "test")}
    return {"task": setup.task_name, "metric": setup.metric, "seed": seed,
            "score": scores["test"][setup.metric], "validation_score": scores["validation"][setup.metric], **scores}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--task", required=True)
    p.add_argument("--max-train-examples", type=int)
    p.add_argument("--max-eval-examples", type=int)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seeds", default="0", help="comma-separated split seeds")
    p.add_argument("--out", help="write the results here as JSON")
    args = p.parse_args()
    opts = TaskOptions(task=args.task, max_train_examples=args.max_train_examples,
                       max_eval_examples=args.max_eval_examples, max_length=args.max_length)
    rows = [base_scores(args.model, opts, int(s)) for s in args.seeds.split(",")]
    for row in rows:
        print(f"{row['task']} seed {row['seed']}: base model test {row['metric']} {row['score']:.4f} "
              f"(validation {row['validation_score']:.4f})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "options": vars(args), "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
