"""Training memory and step time on a quantized frozen base, against QLoRA, LoRA and full
fine-tuning, at equal trainable parameters.

Setups (every linear layer of the transformer blocks targeted; LoRA rank r, the sparse
setups as many entries as LoRA r trains, static random mask, SparseAdamW):

* ``sparse``       sparseft on the float base
* ``sparse-nf4``   sparseft on an NF4 base (``quantize="nf4"``); ``sparse-int8`` on int8
* ``qlora``        peft LoRA on the same NF4 base (bitsandbytes ``Linear4bit``): QLoRA
* ``lora``         peft LoRA on the float base
* ``full``         full fine-tuning, torch AdamW

Each setup runs in its own process (CPU) or in turn (CUDA). Measured per setup:

* CPU: ``extra`` = peak RSS during the training steps minus RSS once the model is loaded,
  quantized and wrapped (the kernel's high-water mark is reset in between); ``whole`` =
  the process's peak RSS over its whole life (loading included: every setup loads the
  float checkpoint first, then quantizes); ``after_load`` = RSS before training.
* CUDA: ``extra`` = ``torch.cuda.max_memory_allocated`` during the steps minus the memory
  allocated after loading; ``whole`` = the allocator's peak over the whole setup.
* ``step_ms``: median step time (forward, backward, optimizer step) after one warm-up
  step; CPU time of the process with ``--clock cpu`` (use one thread), else wall time.

Ratios printed: each setup's extra and whole peak against QLoRA's, and its step time
against the float-base sparse step.

Reproduce (CPU, SmolLM2-135M, one thread)::

    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_quant_memory.py --model smollm2 --batch 4 --seq 128 \\
        --threads 1 --clock cpu --machine '2-vCPU x86-64 VM, no GPU' \\
        --out bench/results/quant/memory_smollm2_b4x128_cpu1.json

GPU: ``bench/run_gpu_quant.sh`` (random-weight 1.2 B and 8 B Llama shapes, bf16, 4 x 512).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import DECODER_TARGETS, LLAMA_1B_CONFIG, SMOLLM2_CONFIG, make_batch  # noqa: E402
from _results import write_result  # noqa: E402

SETUPS = ("sparse", "sparse-nf4", "sparse-int8", "qlora", "lora", "full")
DEFAULT_SETUPS = ("sparse", "sparse-nf4", "qlora", "lora", "full")
LLAMA_8B_CONFIG = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)
RANDOM_CONFIGS = {"smollm2-random": SMOLLM2_CONFIG, "llama-1b-random": LLAMA_1B_CONFIG,
                  "llama-8b-random": LLAMA_8B_CONFIG}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def load_base(model_name: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if model_name == "smollm2":
        from sparseft.app.pretrained import load_causal_lm

        model = load_causal_lm("smollm2")[0].to(device=device, dtype=dtype)
        # The loaded weights may be pages of the memory-mapped checkpoint, counted in RSS only
        # once read, and copied when written: give every setup private, resident weights.
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
        from sparseft.quant import release_freed_memory

        release_freed_memory()
        return model
    if model_name not in RANDOM_CONFIGS:
        raise ValueError(f"unknown --model {model_name!r}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its final dtype, where it runs: no float32 detour
    try:
        with torch.device(device):
            return LlamaForCausalLM(LlamaConfig(**RANDOM_CONFIGS[model_name]))
    finally:
        torch.set_default_dtype(previous)


def build(setup: str, args):
    """(model, optimizer) for a setup; the model is in training mode."""
    import sparseft
    from sparseft.app.baselines import BaselineConfig, get_baseline_model
    from sparseft.train import enable_gradient_checkpointing

    model = load_base(args.model, args.device, DTYPES[args.dtype])
    if setup.startswith("sparse"):
        fmt = setup.partition("-")[2] or None
        sm = sparseft.get_sparse_model(model, sparseft.SparseConfig(
            method="random", match_lora_rank=args.rank, target_modules=DECODER_TARGETS, quantize=fmt))
        built, opt = sm, sparseft.create_optimizer(sm, lr=1e-4)
    else:
        method = "full" if setup == "full" else "lora"
        cfg = BaselineConfig(method=method, lora_rank=None if method == "full" else args.rank,
                             target_modules=DECODER_TARGETS, quantize="nf4" if setup == "qlora" else None)
        built = get_baseline_model(model, cfg)
        opt = built.create_optimizer(1e-4) if method != "full" else torch.optim.AdamW(model.parameters(), lr=1e-5)
    if args.checkpointing:
        enable_gradient_checkpointing(model)
    built.train()
    return built, opt


def _storage_key(t):
    try:
        return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return id(t), t.numel() * t.element_size()


def _nbytes(tensors) -> float:
    """MB of the distinct storages behind ``tensors``."""
    seen = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        ptr, n = _storage_key(t)
        seen[ptr] = max(seen.get(ptr, 0), n)
    return sum(seen.values()) / 2**20


def memory_breakdown(model, opt, batch, autocast: bool, device: str) -> dict:
    """Where the memory goes, counted from the tensors themselves (not RSS): the model's
    frozen weights (float and quantized), trainable parameters, the sparse layers' index
    buffers and their derived layouts, the tensors autograd saves for the backward (the
    activations, each storage once), the gradients and the optimizer state."""
    from sparseft.delta.layer import SparseDeltaLayer

    sparse_layers = [m for m in model.modules() if isinstance(m, SparseDeltaLayer)]
    params = list(model.parameters())
    out = {
        "frozen_float_mb": _nbytes(p for p in params if not p.requires_grad and p.dtype.is_floating_point),
        "frozen_quantized_mb": _nbytes(p for p in params if not p.dtype.is_floating_point),
        "trainable_mb": _nbytes(p for p in params if p.requires_grad),
        "sparse_index_mb": _nbytes(m.indices for m in sparse_layers),
        "sparse_layout_mb": _nbytes(t for m in sparse_layers if m._layout is not None
                                    for t in m._layout.__dict__.values() if isinstance(t, torch.Tensor)
                                    and t is not m.indices),
    }
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
    # Saved parameters and buffers (the values, the index) are alive anyway: not counted.
    known = {_storage_key(t)[0] for t in [*params, *model.buffers()]}
    out["saved_for_backward_mb"] = _nbytes(t for t in saved if _storage_key(t)[0] not in known)
    del saved
    loss.backward()
    out["grads_mb"] = _nbytes(p.grad for p in params if p.grad is not None)
    opt.step()
    out["optimizer_state_mb"] = _nbytes(v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    if sparse_layers:
        out["sparse_layout_after_step_mb"] = _nbytes(
            t for m in sparse_layers if m._layout is not None for t in m._layout.__dict__.values()
            if isinstance(t, torch.Tensor) and t is not m.indices)
    opt.zero_grad(set_to_none=True)
    return out


def trainable(model) -> int:
    if hasattr(model, "num_sparse_params"):
        return model.num_sparse_params()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_setup(setup: str, args) -> dict:
    cuda = args.device.startswith("cuda")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    model, opt = build(setup, args)
    from sparseft.quant import release_freed_memory

    release_freed_memory()
    if cuda:
        torch.cuda.synchronize()
        after_load = (torch.cuda.memory_allocated() - base) / 2**20
        load_peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        after_load, load_peak = _status_mb("VmRSS"), _status_mb("VmHWM")
        _reset_rss_peak()
    batch = make_batch(args.batch, args.seq, "smollm2", args.device)
    times = []
    for _ in range(args.steps + 1):
        t0 = clock()
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - t0)
    if cuda:
        train_peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        train_peak = _status_mb("VmHWM")
    row = {"setup": setup, "trainable_params": trainable(model), "after_load_mb": after_load,
           "extra_mb": train_peak - after_load, "whole_mb": max(load_peak, train_peak),
           "step_ms": statistics.median(times[1:]) * 1000, "all_step_ms": [t * 1000 for t in times],
           "loss": float(loss.detach())}
    if args.breakdown:  # after the measured steps: its bookkeeping does not enter their peak
        row["breakdown"] = memory_breakdown(model, opt, batch, args.autocast, args.device)
    if cuda:
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
    return row


def child_command(setup: str, args) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", setup]
    for name in ("model", "rank", "batch", "seq", "steps", "threads", "clock", "device", "dtype"):
        cmd += [f"--{name}", str(getattr(args, name))]
    return (cmd + (["--checkpointing"] if args.checkpointing else []) + (["--autocast"] if args.autocast else [])
            + (["--breakdown"] if args.breakdown else []))


def table(rows: dict) -> str:
    ref = rows.get("qlora")
    fast = rows.get("sparse")
    lines = ["| setup | trainable | after load MB | extra peak MB | whole peak MB | extra / QLoRA | whole / QLoRA "
             "| step ms | step / float sparse |", "|---|---|---|---|---|---|---|---|---|"]
    for s, r in rows.items():
        ratio = lambda key, other: f"{r[key] / other[key]:.2f}" if other else "-"  # noqa: E731
        lines.append(f"| {s} | {r['trainable_params']:,} | {r['after_load_mb']:.0f} | {r['extra_mb']:.0f} | "
                     f"{r['whole_mb']:.0f} | {ratio('extra_mb', ref)} | {ratio('whole_mb', ref)} | "
                     f"{r['step_ms']:.0f} | {ratio('step_ms', fast)} |")
    return "\n".join(lines)


BREAKDOWN_KEYS = ("frozen_float_mb", "frozen_quantized_mb", "trainable_mb", "sparse_index_mb", "sparse_layout_mb",
                  "saved_for_backward_mb", "grads_mb", "optimizer_state_mb", "sparse_layout_after_step_mb")


def breakdown_table(rows: dict) -> str:
    rows = {s: r["breakdown"] for s, r in rows.items() if "breakdown" in r}
    if not rows:
        return ""
    lines = ["| MB | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for key in BREAKDOWN_KEYS:
        lines.append(f"| {key[:-3]} | " + " | ".join(f"{b[key]:.1f}" if key in b else "-" for b in rows.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", default=",".join(DEFAULT_SETUPS), help=f"from {', '.join(SETUPS)}")
    p.add_argument("--model", default="smollm2", help="smollm2 | smollm2-random | llama-1b-random | llama-8b-random")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank; the sparse setups match its parameter count")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per setup, after one warm-up step")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="the loaded model's dtype")
    p.add_argument("--autocast", action="store_true", help="forward under bf16 autocast")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (non-reentrant)")
    p.add_argument("--breakdown", action="store_true",
                   help="after the measured steps, one more step counting the tensors by kind (frozen and quantized "
                        "weights, trainable parameters, sparse index and layout buffers, tensors saved for the "
                        "backward, gradients, optimizer state), from the tensors themselves")
    p.add_argument("--mmap-threshold", type=int, default=65536,
                   help="CPU: glibc's MALLOC_MMAP_THRESHOLD_ for each setup's process (bytes; 0: glibc's default, "
                        "which raises the threshold as blocks are freed, so freed per-layer buffers stay in the heap "
                        "and in RSS). A fixed threshold returns every large block to the system when it is freed: "
                        "RSS then follows live memory, as the CUDA allocator's count does")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--machine", help="a description of the machine, kept in the results (e.g. '2-vCPU x86-64 VM, no GPU')")
    p.add_argument("--out")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_setup(args.child, args)))
        return
    rows = {}
    for setup in args.setups.split(","):
        if setup not in SETUPS:
            raise SystemExit(f"unknown setup {setup!r}; choose from {', '.join(SETUPS)}")
        if args.device.startswith("cuda"):
            rows[setup] = run_setup(setup, args)
        else:
            env = dict(os.environ)
            if args.mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
            out = subprocess.run(child_command(setup, args), check=True, capture_output=True, text=True,
                                 env=env).stdout
            rows[setup] = json.loads(out.strip().splitlines()[-1])
        print(f"{setup}: {json.dumps({k: v for k, v in rows[setup].items() if k != 'all_step_ms'})}", flush=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {"rows": rows, "meta": {
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": args.threads,
        "machine": platform.machine(), "device": args.device, "device_name": device_name,
        "machine_description": args.machine,
        "memory": "CUDA max_memory_allocated" if args.device.startswith("cuda") else "RSS (/proc/self/status)",
        "command": "python bench/bench_quant_memory.py " + " ".join(sys.argv[1:]), "loadavg": os.getloadavg(),
        **{k: getattr(args, k) for k in ("model", "rank", "batch", "seq", "steps", "clock", "dtype", "autocast",
                                          "checkpointing", "mmap_threshold", "breakdown")}}}
    try:
        from sparseft.quant import quiet_bitsandbytes_import

        with quiet_bitsandbytes_import():
            import bitsandbytes
        result["meta"]["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    print(table(rows))
    print(breakdown_table(rows))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
