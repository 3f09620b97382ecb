"""Multi-process smoke test: sparse training under DDP, FSDP2 or transformers.Trainer
equals one process with the whole batch.

Launch it with torchrun or accelerate launch (CPU with gloo, or CUDA with NCCL, one GPU
per process):

    torchrun --nproc_per_node 2 bench/distributed_smoke.py --mode ddp --method id3
    torchrun --nproc_per_node 2 bench/distributed_smoke.py --mode fsdp2 --method dst
    accelerate launch --multi_gpu --num_processes 2 bench/distributed_smoke.py --mode trainer --method gradient --schedule dynamic

(``accelerate launch --cpu --num_processes 2`` starts one process only, unless given an MPI
hostfile; ``--multi_gpu`` uses the torchrun launcher and, without GPUs, the Trainer runs on
CPU with gloo.)

Each rank trains a small randomly initialised model (no downloads) for ``--steps`` steps on
its shard of every global batch, checks after every step that all ranks hold the same
index sets, and rank 0 saves the adapter. Rank 0 then runs the same training in one
process with the whole batches (a subprocess without the launcher's environment) and
compares: index sets exactly, values within ``--rtol``/``--atol``. It prints one JSON line
and exits 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import sparseft
from sparseft.distributed import fully_shard_sparse, index_sets_agree, is_main_process

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
              "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("ddp", "fsdp2", "trainer"), default="ddp")
    p.add_argument("--model", choices=("llama", "bert"), default="llama",
                   help="llama: causal LM, nothing dense trained; bert: classifier with a dense head")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--method", default="random")
    p.add_argument("--schedule", default="static")
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-2 (adamw), 1.0 (sgd)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default=None,
                   help="default: sgd for dst, adamw otherwise. DST's projection ranks |delta|; after Adam's first "
                        "steps nearly every entry has moved by about lr, so the ranking is decided by fp32 rounding, "
                        "which a batch summed in parts changes: compare DST runs with sgd")
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--out", default="runs/distributed_smoke")
    p.add_argument("--single", action="store_true", help="(internal) the one-process reference run")
    return p.parse_args(argv)


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def build(args, device):
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.model == "llama":
        cfg = LlamaConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=args.seq, tie_word_embeddings=True)
        base = LlamaForCausalLM(cfg)
    else:
        cfg = BertConfig(vocab_size=128, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                         intermediate_size=2 * args.hidden, num_labels=2, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
        base = BertForSequenceClassification(cfg)
    base.to(device)
    extra = {"dynamic": {"update_every": 2, "score_window": 1, "drop_policy": "zero"}} if args.schedule == "dynamic" else {}
    if args.method == "grow-drop":
        extra.update(grow_drop={"every": 2})
    config = sparseft.SparseConfig(method=args.method, schedule=args.schedule, density=args.density, seed=1, **extra)
    calibration = global_batches(args, device)[:1]
    return sparseft.get_sparse_model(base, config, calibration_data=calibration)


def global_batches(args, device):
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(args.steps):
        ids = torch.randint(3, 128, (args.global_batch, args.seq), generator=gen)
        labels = ids.clone() if args.model == "llama" else (ids[:, 0] > 64).long()
        out.append({"input_ids": ids.to(device), "labels": labels.to(device)})
    return out


def my_shard(batch, rank, world):
    n = batch["input_ids"].shape[0] // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def make_optimizer(model, args):
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.sparse_parameters() + model.dense_trainable_parameters(), lr=args.lr)
    return sparseft.create_optimizer(model, lr=args.lr)


def train_loop(model, batches, args, wrap=None, check=None):
    from sparseft.train import SparseController

    controller = SparseController(model)  # before any wrapper: it marks the values as DDP-ignored
    forward = wrap(model) if wrap is not None else model
    optimizer = make_optimizer(model, args)  # after FSDP2 replaced the parameters it shards
    controller.optimizer = optimizer
    controller.train_begin(len(batches))
    for step, batch in enumerate(batches, start=1):
        with controller.step(optimizer, batch):
            forward(**batch).loss.backward()
        if check is not None:
            check(step)
    controller.train_end()


def train_trainer(model, args, per_device):
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback
    from transformers import TrainingArguments as HFArguments

    class InOrder(Trainer):  # the same examples in the same order as the one-process run
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    class Check(TrainerCallback):
        def on_step_end(self, a, state, control, **k):
            if not index_sets_agree(model):
                raise SystemExit(f"index sets differ between ranks after step {state.global_step}")

    callback = sparseft.SparseCallback(model)  # before the Trainer wraps the model
    examples = [{k: v[i].cpu() for k, v in b.items()} for b in global_batches(args, "cpu") for i in range(args.global_batch)]
    hf = HFArguments(output_dir=os.path.join(args.out, "trainer"), use_cpu=not torch.cuda.is_available(),
                     per_device_train_batch_size=per_device, max_steps=args.steps, learning_rate=args.lr,
                     lr_scheduler_type="constant", max_grad_norm=1.0, report_to=[], save_strategy="no",
                     logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                     average_tokens_across_devices=False)
    trainer = InOrder(model=model, args=hf, train_dataset=examples, callbacks=[callback, Check()],
                      optimizers=(make_optimizer(model, args), None))
    trainer.train()


def state(model):
    out = {}
    for name, layer in model.sparse_layers().items():
        out[f"{name}.indices"] = layer.indices.detach().cpu()
        out[f"{name}.values"] = layer.values.detach().float().cpu()
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.optimizer is None:
        args.optimizer = "sgd" if args.method == "dst" else "adamw"
    if args.lr is None:
        args.lr = 1.0 if args.optimizer == "sgd" else 1e-2
    out = Path(args.out)
    device = device_for_rank()
    if args.single:
        model = build(args, device)
        if args.mode == "trainer":
            train_trainer(model, args, args.global_batch)
        else:
            train_loop(model, global_batches(args, device), args)
        torch.save(state(model), out / "single.pt")
        return 0

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world < 2:
        raise SystemExit("launch with torchrun or accelerate launch and at least 2 processes")
    if args.mode != "trainer":  # under the Trainer, accelerate creates the group
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = int(os.environ["RANK"])
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of the {world} processes")
    out.mkdir(parents=True, exist_ok=True)
    model = build(args, device)
    started = time.perf_counter()

    def check(step):
        if not index_sets_agree(model):
            raise SystemExit(f"index sets differ between ranks after step {step}")

    if args.mode == "trainer":
        train_trainer(model, args, args.global_batch // world)
    else:
        wrap = fully_shard_sparse if args.mode == "fsdp2" else torch.nn.parallel.DistributedDataParallel
        mine = [my_shard(b, rank, world) for b in global_batches(args, device)]
        train_loop(model, mine, args, wrap=wrap, check=check)
    seconds = time.perf_counter() - started
    model.save_pretrained(out / "adapter")  # every rank calls it; rank 0 writes
    got = state(model)
    torch.distributed.barrier()
    if not is_main_process():
        return 0

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]), "--single"]
    subprocess.run(cmd, env=env, check=True)
    ref = torch.load(out / "single.pt")
    bad, worst = [], 0.0
    for key, value in ref.items():
        if key.endswith(".indices"):
            if not torch.equal(value, got[key]):
                bad.append(key)
        elif value.shape != got[key].shape or not torch.allclose(got[key], value, rtol=args.rtol, atol=args.atol):
            bad.append(key)
        elif value.numel():
            worst = max(worst, float((got[key] - value).abs().max()))
    report = {"mode": args.mode, "model": args.model, "method": args.method, "schedule": args.schedule,
              "optimizer": args.optimizer,
              "world_size": world, "device": str(device), "torch": torch.__version__, "steps": args.steps,
              "entries": sum(v.numel() for k, v in got.items() if k.endswith(".indices")),
              "train_seconds": round(seconds, 3), "max_abs_diff": worst, "mismatches": bad[:5],
              "ok": not bad}
    print(json.dumps(report))
    (out / "result.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
