"""Seconds of one training epoch of the default run, the yardstick for selection time
("selection <= 10 % of a one-epoch run"): rt-sentiment on the default model (MiniLM),
``--max-train-examples`` training examples (default 1,024), batch 32, max length 64, a
random mask at ``--density``, on the CPU with ``--threads`` torch threads.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_epoch.py --machine "..." --out epoch.json

Reports wall and process CPU seconds of the training loop alone (``sparseft.train``;
no selection, no evaluation). On a shared machine the CPU seconds are the figure to
compare with ``bench_selection.py``'s ``cpu_seconds``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-train-examples", type=int, default=1024)
    p.add_argument("--density", type=float, default=0.005)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("--machine", help="name the machine in the result (a dated report)")
    ns = p.parse_args()

    import torch

    from sparseft import SparseConfig, get_sparse_model
    from sparseft.app.prepare import prepare
    from sparseft.app.spec import RunSpec, TaskOptions
    from sparseft.train import TrainingArguments, train

    torch.set_num_threads(ns.threads)
    spec = RunSpec(out="", data=TaskOptions(task="rt-sentiment", max_train_examples=ns.max_train_examples,
                                            batch_size=ns.batch_size, max_length=ns.max_length),
                   training=TrainingArguments(lr=5e-3, epochs=1.0, progress=False, save_minutes=0), device="cpu")
    torch.manual_seed(0)
    setup = prepare(spec)
    model = get_sparse_model(setup.base, SparseConfig(method="random", density=ns.density,
                                                      modules_to_save=list(setup.new_heads)))
    start, cpu_start = time.perf_counter(), time.process_time()
    result = train(model, setup.train_loader, spec.training)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    out = {"task": "rt-sentiment", "model": "default (all-MiniLM-L6-v2)", "method": "random", "density": ns.density,
           "train_examples": len(setup.train_loader.dataset), "batch_size": ns.batch_size,
           "max_length": ns.max_length, "steps": result.steps, "seconds": round(seconds, 2),
           "cpu_seconds": round(cpu_seconds, 2), "median_step_s": round(result.median_step_time, 3),
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    if ns.machine:
        out = {"date": time.strftime("%Y-%m-%d"), "machine": ns.machine,
               "command": "OMP_NUM_THREADS=1 PYTHONPATH=src python " + shlex.join(sys.argv), **out}
    print(json.dumps(out), flush=True)
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
