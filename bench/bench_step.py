"""Model-level benchmark: one training step per method, on CPU or GPU.

What is measured
----------------
Median wall time of one optimizer step (forward + backward + optimizer step + zero_grad)
on a fixed batch, for:

* ``floor``        every weight frozen, gradients flowing to the inputs (``inputs_embeds``
                   requires grad): the least any fine-tuning method can cost.
* ``sparse``       sparseft, static random mask with as many entries as LoRA r (``--rank``)
                   on the same targets; SparseAdamW.
* ``tile16``       the same with a tile mask (``granularity="tile16"``: random whole 16 x 16
                   tiles, as many entries up to half a tile); its values' gradient is the
                   block-sparse path.
* ``tile32``       the same with 32 x 32 tiles.
* ``lora``         peft LoRA of rank r on every linear layer of the transformer blocks.
* ``shira``        peft SHiRA with the same parameter count (peft's own sparse method).
* ``supertuning``  peft Super-Tuning (magnitude support) at the same density.
* ``full``         full fine-tuning, torch AdamW.

Models (``--model``): ``default`` is the embedded MiniLM classifier (pretrained; its new
classification head is trained densely by every method), ``smollm2`` the pretrained
SmolLM2-135M causal LM (next-token loss on the batch itself). ``minilm-random``,
``smollm2-random`` and ``llama-1b-random`` build the same architectures (and a 1.2 B
Llama-3.2-1B-shaped decoder) from their configs with random weights: step time does not
depend on the weights' values, and they need no model package (e.g. on a GPU machine).

``--compile MODE`` runs every setup's model through ``torch.compile(model, mode=MODE)``
(optimizer steps stay eager). On CUDA, ``reduce-overhead`` captures the compiled forward and
backward as CUDA graphs (a static mask's step has static shapes); the sparse layers enter
the graph as sparseft's custom ops (``delta/function.py``). Under compile a tile mask's
values' gradient takes the entry SDDMM path (the ops carry no tile coordinates).

Setups are interleaved round-robin after a warm-up, so the ratios come from one stretch of
machine time. On CUDA every step is bracketed by ``torch.cuda.synchronize()``.

With ``--memory`` each setup runs alone (CPU: in its own process, peak RSS; CUDA: in turn,
``torch.cuda.max_memory_allocated``) and the peak is reported next to the memory right
after loading.

Reproduce::

    python bench/bench_step.py --reps 6 --out bench/results/step_minilm.json
    python bench/bench_step.py --memory --out bench/results/step_minilm_memory.json
    python bench/bench_step.py --model smollm2-random --device cuda --dtype bf16 --batch 8 --seq 256 --reps 20
    python bench/bench_step.py --model llama-1b-random --device cuda --dtype bf16 --batch 4 --seq 512 \
        --compile reduce-overhead --setups floor,lora,sparse --reps 10 --warmup 4
    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_step.py --threads 1 --clock cpu --reps 8 --warmup 2 \
        --setups floor,sparse,tile16,tile32,lora --out bench/results/2026-11-29/step_minilm_tiles_cpu1.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from _results import write_result

SETUPS = ("floor", "sparse", "lora", "shira", "supertuning", "full")
OPTIONAL_SETUPS = ("tile16", "tile32")  # run when named in --setups
TARGETS = ["query", "key", "value", "dense"]  # every Linear of the BERT encoder and pooler
DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Architectures for random-init runs (the shapes of the published configs).
MINILM_CONFIG = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, num_labels=2)
SMOLLM2_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
LLAMA_1B_CONFIG = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True)
LLAMA_8B_CONFIG = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)
RANDOM_LLAMAS = {"smollm2-random": SMOLLM2_CONFIG, "llama-1b-random": LLAMA_1B_CONFIG, "llama-8b-random": LLAMA_8B_CONFIG}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def is_causal(model_name: str) -> bool:
    return model_name not in ("default", "minilm-random")


def targets_for(model_name: str) -> list[str]:
    return DECODER_TARGETS if is_causal(model_name) else TARGETS


def load_base(model_name: str = "default", device: str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if model_name == "default":
        from sparseft.app.pretrained import load_classifier

        model, _, _ = load_classifier("default", num_labels=2)
    elif model_name == "smollm2":
        from sparseft.app.pretrained import load_causal_lm

        model, _ = load_causal_lm("smollm2")
    elif model_name == "minilm-random":
        model = BertForSequenceClassification(BertConfig(**MINILM_CONFIG))
    elif model_name in RANDOM_LLAMAS:
        config = RANDOM_LLAMAS[model_name]
        with torch.device(device):  # a 1 B model is built where it runs
            model = LlamaForCausalLM(LlamaConfig(**config))
    else:
        raise ValueError(f"unknown --model {model_name!r}")
    return model.to(device=device, dtype=dtype)


def lora_param_count(model, rank: int, targets: list[str] = TARGETS) -> int:
    from sparseft.inject import find_target_modules
    from sparseft.delta import linear_shape
    from sparseft.select import lora_equivalent_params

    names = find_target_modules(model, targets, modules_to_save=["classifier"])
    return lora_equivalent_params({n: linear_shape(model.get_submodule(n)) for n in names}, rank)


def build(setup: str, rank: int, model_name: str = "default", device: str = "cpu", dtype: str = "fp32"):
    """(model, optimizer or None, uses_inputs_embeds)."""
    import peft

    import sparseft

    model = load_base(model_name, device, DTYPES[dtype])
    targets = targets_for(model_name)
    heads = [] if is_causal(model_name) else ["classifier"]
    targeted = sum(m.weight.numel() for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets)
    k = lora_param_count(model, rank, targets)
    if setup == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        return model, None, True
    if setup == "full":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5), False
    if setup in ("sparse", "tile16", "tile32"):
        granularity = "entry" if setup == "sparse" else setup
        sm = sparseft.get_sparse_model(model, sparseft.SparseConfig(method="random", num_params=k, target_modules=targets,
                                                                    granularity=granularity))
        return sm, sparseft.create_optimizer(sm, lr=1e-3), False
    if setup == "lora":
        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                              modules_to_save=heads)
    elif setup == "shira":
        cfg = peft.ShiraConfig(r=rank, target_modules=targets, modules_to_save=heads)
    elif setup == "supertuning":
        cfg = peft.SupertuningConfig(sparsity=1 - k / targeted, target_modules=targets, modules_to_save=heads)
    else:
        raise ValueError(setup)
    pm = peft.get_peft_model(model, cfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    return pm, torch.optim.AdamW(params, lr=1e-3), False


def trainable_count(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)


def make_batch(batch: int, seq: int, model_name: str = "default", device: str = "cpu"):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 29000, (batch, seq), generator=gen)
    labels = ids.clone() if is_causal(model_name) else torch.randint(0, 2, (batch,), generator=gen)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in out.items()}


def build_from_args(setup: str, args):
    return build(setup, args.rank, args.model, args.device, args.dtype)


def batch_from_args(args):
    return make_batch(args.batch, args.seq, args.model, args.device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_without_dropout(model) -> None:
    """Training mode with every dropout off: each timed step then does the same arithmetic."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def make_step(model, optimizer, uses_embeds: bool, batch: dict):
    if uses_embeds:
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach()

        def step():
            x = embeds.clone().requires_grad_(True)
            model(inputs_embeds=x, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        return step

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def compiled(built: tuple, mode: str, backend: str = "inductor") -> tuple:
    """(model, optimizer, uses_embeds) with the model run through torch.compile."""
    model, optimizer, uses_embeds = built
    options = {"mode": mode} if backend == "inductor" else {}
    return torch.compile(model, backend=backend, **options), optimizer, uses_embeds


def run_timing(args) -> dict:
    batch = batch_from_args(args)
    built = {s: build_from_args(s, args) for s in args.setups}
    for model, _, _ in built.values():
        train_without_dropout(model)
    if getattr(args, "compile", None):
        built = {s: compiled(b, args.compile, args.compile_backend) for s, b in built.items()}
    steps = {s: make_step(*built[s], batch) for s in args.setups}
    times = {s: [] for s in args.setups}
    for rep in range(args.warmup + args.reps):
        for s in args.setups:
            synchronize(args.device)
            if getattr(args, "compile", None):
                torch.compiler.cudagraph_mark_step_begin()  # the setups' CUDA graphs take turns
            timer = getattr(args, "timer", time.perf_counter)
            t0 = timer()
            steps[s]()
            synchronize(args.device)
            if rep >= args.warmup:
                times[s].append(timer() - t0)
    median = {s: statistics.median(v) * 1000 for s, v in times.items()}
    # Ratios within each round (neighbouring steps) as well: their spread shows the machine's noise.
    round_ratios = {}
    for mine in ("sparse", "tile16", "tile32"):
        for ref in ("floor", "lora"):
            if mine in times and ref in times:
                r = [a / b for a, b in zip(times[mine], times[ref])]
                round_ratios[f"{mine}/{ref}"] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
    return {
        "median_ms": median,
        "round_ratios": round_ratios,
        "all_ms": {s: [t * 1000 for t in v] for s, v in times.items()},
        "trainable_params": {s: trainable_count(built[s][0]) for s in args.setups},
        "ratios": {f"{mine}/{ref}": median[mine] / median[ref]
                   for mine in ("sparse", "tile16", "tile32") for ref in ("floor", "lora", "full")
                   if mine in median and ref in median},
    }


def run_memory_child(setup: str, args) -> dict:
    model, opt, embeds = build_from_args(setup, args)
    model.train()
    after_load = rss_mb()
    step = make_step(model, opt, embeds, batch_from_args(args))
    for _ in range(args.steps):
        step()
    return {"setup": setup, "rss_after_load_mb": after_load, "peak_rss_mb": rss_mb(), "trainable_params": trainable_count(model)}


def run_cuda_memory(args) -> dict:
    """GPU memory of each setup in turn (the allocator's own count, so nothing else leaks in)."""
    rows = {}
    for s in args.setups:
        gc.collect()  # the previous setup's model may sit in reference cycles
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        model, opt, embeds = build_from_args(s, args)
        model.train()
        after_load = torch.cuda.memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        step = make_step(model, opt, embeds, batch_from_args(args))
        for _ in range(args.steps):
            step()
        synchronize(args.device)
        rows[s] = {"setup": s, "rss_after_load_mb": after_load / 2**20,
                   "peak_rss_mb": (torch.cuda.max_memory_allocated() - base) / 2**20,
                   "trainable_params": trainable_count(model)}
        del model, opt, step
    return {"memory": rows, "memory_kind": "cuda max_memory_allocated"}


def run_memory(args) -> dict:
    if args.device.startswith("cuda"):
        return run_cuda_memory(args)
    rows = {}
    for s in args.setups:
        cmd = [sys.executable, __file__, "--child", s, "--rank", str(args.rank), "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--model", args.model,
               "--device", args.device, "--dtype", args.dtype]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[s] = json.loads(out.strip().splitlines()[-1])
    return {"memory": rows}


def table(result: dict) -> str:
    lines = []
    if "median_ms" in result:
        m = result["median_ms"]
        floor = m.get("floor")
        lines += ["| setup | trainable (excl. head) | step ms | / floor | sparse / this |", "|---|---|---|---|---|"]
        for s, ms in m.items():
            lines.append(f"| {s} | {result['trainable_params'][s]:,} | {ms:.0f} | {ms / floor:.2f} | {m.get('sparse', float('nan')) / ms:.2f} |")
        for name, r in result.get("round_ratios", {}).items():
            lines.append(f"\n{name} within each round: median {r['median']:.2f} [min {r['min']:.2f}, max {r['max']:.2f}]")
    if "memory" in result:
        kind = "GPU allocated" if "memory_kind" in result else "RSS"
        lines += [f"| setup | {kind} after load MB | peak {kind} MB | peak - load MB |", "|---|---|---|---|"]
        for s, r in result["memory"].items():
            lines.append(f"| {s} | {r['rss_after_load_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['rss_after_load_mb']:.0f} |")
    return "\n".join(lines)


def add_timing_options(p: argparse.ArgumentParser) -> None:
    """--threads, --clock and --out, shared by the benches built on this one."""
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time (time.process_time), far less disturbed by other jobs on a "
                        "shared machine; use it with --threads 1 (with more threads it counts OpenMP spin-waiting)")
    p.add_argument("--out")


def apply_timing_options(args):
    """Sets the thread count and offline mode; returns the clock the options chose."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    return time.process_time if args.clock == "cpu" else time.perf_counter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", default=",".join(SETUPS), help=f"any of {', '.join(SETUPS + OPTIONAL_SETUPS)}")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank; the sparse methods match its parameter count")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="peak RSS per setup, each in its own process")
    p.add_argument("--steps", type=int, default=3, help="steps per process with --memory")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", default="default",
                   help="default | smollm2 | minilm-random | smollm2-random | llama-1b-random | llama-8b-random")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--compile", metavar="MODE",
                   help="torch.compile every setup's model with this mode (default, reduce-overhead, max-autotune, "
                        "...); reduce-overhead captures CUDA graphs on a GPU")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: a quick check)")
    add_timing_options(p)
    args = p.parse_args()
    args.timer = apply_timing_options(args)
    args.setups = args.setups.split(",")
    if args.child:
        print(json.dumps(run_memory_child(args.child, args)))
        return
    result = run_memory(args) if args.memory else run_timing(args)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result["meta"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
                      "seq": args.seq, "rank": args.rank, "machine": platform.machine(), "model": args.model,
                      "device": args.device, "device_name": device_name, "dtype": args.dtype,
                      "clock": args.clock, "loadavg": os.getloadavg(), "compile": args.compile,
                      "argv": sys.argv[1:]}
    print(table(result))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
