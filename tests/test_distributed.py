"""Two processes on CPU (gloo) against one process with the double batch.

For every method (static, dynamic, ID3, grow-drop, DST), N optimizer steps on 2 ranks x
batch b must give the same index sets (exactly, at every step, on both ranks) and the
same values (fp32, tight tolerance) as 1 process with batch 2b; the adapter saved under
DDP must equal the single-process one, and only rank 0 may write it.

DDP ignores the sparse values (their storage changes with the index sets); the
``SparseController`` averages their gradients over ranks (``sparseft.distributed``).
One spawn runs every case: starting processes is the slow part.
"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

import sparseft
from sparseft.distributed import full_tensor, fully_shard_sparse, index_sets_agree

STEPS, PER_RANK = 4, 4
CONFIGS = {
    "random": dict(method="random"),
    "gradient-static": dict(method="gradient"),  # calibration scores all-reduced
    "dynamic-gradient": dict(method="gradient", schedule="dynamic", dynamic=dict(update_every=2, score_window=1)),  # merge
    "dynamic-random": dict(method="random", schedule="dynamic", dynamic=dict(update_every=2, score_window=1, drop_policy="zero")),
    "id3": dict(method="id3", num_params=60, id3=dict(unmask_every=1)),
    "id3-every2": dict(method="id3", num_params=60, id3=dict(unmask_every=2, d3_exponent=1.0)),
    "grow-drop": dict(method="grow-drop", grow_drop=dict(every=2, fraction=0.5)),
    "dst": dict(method="dst"),
}
# Run through sparseft.train (DDP wrapper built inside, gradient accumulation, clipping,
# warmup schedule) rather than the bare controller loop.
TRAIN_LOOP = {"dynamic-gradient-train": "dynamic-gradient", "id3-train": "id3"}
# transformers.Trainer (accelerate's DDP wrapper, its data sharding, clipping before any callback).
# "llama-trainer": a causal LM that trains nothing dense (tied embeddings, no task head):
# DDP needs sparseft's empty anchor parameter to accept it.
# "-ga": two micro-batches per optimizer step (gradient_accumulation_steps=2).
TRAINER = {"dynamic-gradient-trainer": "dynamic-gradient", "id3-trainer": "id3", "id3-trainer-ga": "id3",
           "llama-trainer": "random"}
# FSDP2: base weights sharded per BertLayer and at the root; the values stay whole.
# Rescoring by snip and d3 with an exponent reads the sharded frozen weights (gathered).
FSDP2 = {"fsdp2-random": "random", "fsdp2-dynamic-gradient": "dynamic-gradient-zero", "fsdp2-dynamic-snip": "dynamic-snip",
         "fsdp2-id3": "id3", "fsdp2-id3-every2": "id3-every2", "fsdp2-grow-drop": "grow-drop", "fsdp2-dst": "dst"}
CONFIGS["dynamic-gradient-zero"] = dict(CONFIGS["dynamic-gradient"], dynamic=dict(update_every=2, score_window=1, drop_policy="zero"))
CONFIGS["dynamic-snip"] = dict(CONFIGS["dynamic-gradient-zero"], method="snip")
BASE = {**TRAIN_LOOP, **TRAINER, **FSDP2}
CASES = list(CONFIGS) + list(BASE)


def build(kind):
    torch.manual_seed(0)
    if kind == "llama-trainer":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)
        model = sparseft.get_sparse_model(LlamaForCausalLM(cfg), sparseft.SparseConfig(method="random", density=0.1, seed=3))
        assert not model.dense_trainable_parameters()
        return model
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    kw = dict(CONFIGS[BASE.get(kind, kind)])
    if "num_params" not in kw:
        kw["density"] = 0.1
    return sparseft.get_sparse_model(BertForSequenceClassification(cfg), sparseft.SparseConfig(seed=3, **kw),
                                     calibration_data=batches()[:1])


def batches():
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(5, 50, (2 * PER_RANK, 9), generator=gen)
        out.append({"input_ids": ids, "labels": (ids[:, 0] > 25).long()})
    return out


def shard(batch, rank, world=2):
    n = batch["input_ids"].shape[0] // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def snapshot(model):
    return {n: l.indices.clone() for n, l in model.sparse_layers().items()}


def final_state(model, trace):
    out = {n: l.values.detach().clone() for n, l in model.sparse_layers().items()}
    out.update({f"{n}.indices": l.indices.clone() for n, l in model.sparse_layers().items()})
    out.update({f"head.{n}": full_tensor(p.detach()).clone() for n, p in model.named_parameters()
                if p.requires_grad and not n.endswith(".values") and not n.endswith(".ddp_anchor")})
    out["trace"] = trace
    return out


def run_steps(model, step_batches, wrap=None, check=None):
    """The plain loop's order of calls, so methods that move entries take part."""
    from sparseft.train import SparseController

    controller = SparseController(model)  # before DDP: it marks the values as DDP-ignored
    forward = wrap(model) if wrap is not None else model
    if model.method.name == "dst":
        # Adam's first steps move every silo entry by about lr (|update| = lr*|g|/(|g|+eps)):
        # the projection's top-k then separates entries by fp32 rounding, which summing the
        # batch in two halves changes. SGD's update is proportional to |g|: a fair test of
        # the distributed part (the method itself takes any optimizer).
        params = model.sparse_parameters() + model.dense_trainable_parameters()
        opt = torch.optim.SGD(params, lr=1.0, weight_decay=0.01)
    else:
        opt = sparseft.create_optimizer(model, lr=1e-2, weight_decay=0.01)  # after FSDP2 replaced its parameters
    controller.optimizer = opt
    controller.train_begin(len(step_batches))
    trace = []
    for step, batch in enumerate(step_batches, start=1):
        with controller.step(opt, batch):
            forward(**batch).loss.backward()
        trace.append(snapshot(model))
        if check is not None:
            check()
    controller.train_end()
    return final_state(model, trace)


def run_train(model, micro_batches):
    """sparseft.train with two micro-batches per optimizer step, clipping and warmup."""
    args = sparseft.TrainingArguments(lr=1e-2, weight_decay=0.01, max_steps=STEPS, grad_accum=2,
                                      warmup_ratio=0.25, max_grad_norm=0.5, progress=False)
    sparseft.train(model, micro_batches, args)
    return final_state(model, [])


def micro_batches(rank=None):
    """Two micro-batches per step. Rank r's micro-batch i is the i-th half of its shard;
    one process gets both ranks' micro-batch i together."""
    out = []
    for b in batches():
        halves = [shard(b, r) for r in range(2)]
        for i in range(2):
            if rank is None:
                out.append({k: torch.cat([shard(h, i)[k] for h in halves]) for k in b})
            else:
                out.append(shard(halves[rank], i))
    return out


def run_trainer(model, per_device, out_dir, accumulate=1):
    """transformers.Trainer with sparseft.SparseCallback, data in order (no shuffling)."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer
    from transformers import TrainingArguments as HFArguments

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    callback = sparseft.SparseCallback(model)  # before the Trainer wraps the model in DDP
    examples = [{k: v[i] for k, v in b.items()} for b in batches() for i in range(2 * PER_RANK)]
    if not hasattr(model.model, "classifier"):  # causal LM: predict the sequence itself
        examples = [{"input_ids": e["input_ids"], "labels": e["input_ids"]} for e in examples]
    args = HFArguments(output_dir=out_dir, use_cpu=True, per_device_train_batch_size=per_device // accumulate,
                       gradient_accumulation_steps=accumulate, max_steps=STEPS,
                       learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=0.5, report_to=[],
                       save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                       # BERT's forward takes **kwargs but its loss ignores num_items_in_batch: with
                       # token averaging on, the Trainer would scale every rank's loss by the world
                       # size (a Trainer matter, dense models too), and the runs would not compare.
                       average_tokens_across_devices=False)
    trace = []

    class Trace(sparseft.SparseCallback.__mro__[1]):  # a plain TrainerCallback
        def on_step_end(self, *a, **k):
            trace.append(snapshot(model))

    trainer = InOrder(model=model, args=args, train_dataset=examples, callbacks=[callback, Trace()],
                      optimizers=(sparseft.create_optimizer(model, lr=1e-2, weight_decay=0.01), None))
    trainer.train()
    return final_state(model, trace)


def run_case(case, rank, out_dir):
    """One case on this process: ``rank`` None is the single-process reference."""
    model = build(case)
    if case in TRAIN_LOOP:
        return model, run_train(model, micro_batches(rank))
    if case in TRAINER:
        # With accumulation, accelerate deals the per-device micro-batches out in turn:
        # rank r's micro-batches of step 1 are examples [2r, 2r+2) and [4+2r, 6+2r), one
        # process's are [0, 4) and [4, 8): the same 8 examples per optimizer step.
        return model, run_trainer(model, PER_RANK if rank is not None else 2 * PER_RANK,
                                  os.path.join(out_dir, f"{case}-trainer-{rank}"),
                                  accumulate=2 if case.endswith("-ga") else 1)
    if rank is None:
        return model, run_steps(model, batches())
    assert index_sets_agree(model)
    wrap = fully_shard_sparse if case in FSDP2 else torch.nn.parallel.DistributedDataParallel
    mine = [shard(b, rank) for b in batches()]
    return model, run_steps(model, mine, wrap=wrap, check=lambda: _assert(index_sets_agree(model)))


def worker(rank, world, store, out_dir):
    torch.set_num_threads(1)
    # What torchrun / accelerate launch set; accelerate (under the Trainer) reads them and
    # reuses the process group below.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1")
    # A timeout turns a lost peer into an error instead of a 30-minute hang.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    for case in CASES:
        model, got = run_case(case, rank, out_dir)
        assert index_sets_agree(model)
        if case == "llama-trainer":  # DDP accepted it thanks to the anchor
            assert sum(layer.ddp_anchor is not None for layer in model.sparse_layers().values()) == 1
        if case in FSDP2:  # the base weights really are sharded (outside forward)
            weight = next(iter(model.sparse_layers().values())).weight
            assert hasattr(weight, "to_local") and weight.to_local().numel() < weight.numel()
        torch.save(got, os.path.join(out_dir, f"{case}-rank{rank}.pt"))
        # Every rank calls save_pretrained; only rank 0 writes.
        model.save_pretrained(os.path.join(out_dir, f"{case}-adapter" if rank == 0 else f"{case}-adapter-rank{rank}"))
    dist.barrier()
    # Tearing the gloo group down (destroy_process_group, or its destructor at interpreter
    # exit) sometimes waited forever for a peer that had already exited (seen in CI, with a
    # file store). Everything is written and both ranks passed the barrier: leave at once.
    os._exit(0)


def _assert(ok):
    assert ok, "index sets differ between ranks"


def _moved(trace):
    return any(not torch.equal(a[n], b[n]) for a, b in zip(trace, trace[1:]) for n in a)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Both ranks run every case once (starting processes is the slow part); the parent
    computes the single-process references."""
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(worker, args=(2, str(out / "store"), str(out)), nprocs=2, join=True)
    references = {}
    for case in CASES:
        if BASE.get(case, case) not in references or case in TRAIN_LOOP or case in TRAINER:
            model, ref = run_case(case, None, str(out))
            model.save_pretrained(out / f"{case}-reference")
            references[case] = ref
        else:
            references[case] = references[BASE[case]]  # FSDP2 against the same single-process run
            references[f"{case}-dir"] = BASE[case]
    return out, references


def check_case(out, references, case):
    reference = references[case]
    kw = CONFIGS[BASE.get(case, case)]
    if reference["trace"] and (kw.get("schedule") == "dynamic" or kw["method"] in ("id3", "grow-drop")):
        assert _moved(reference["trace"]), f"{case}: the test needs index sets that change"
    for rank in range(2):
        got = torch.load(out / f"{case}-rank{rank}.pt")
        trace = got.pop("trace")
        assert len(trace) == len(reference["trace"])
        for step, (mine, ref) in enumerate(zip(trace, reference["trace"]), start=1):
            for name in ref:
                assert torch.equal(mine[name], ref[name]), f"{case} rank {rank} step {step} {name}"
        assert got.keys() == {k for k in reference if k != "trace"}
        for name, ref in reference.items():
            if name == "trace":
                continue
            if name.endswith("indices"):
                assert torch.equal(got[name], ref), f"{case} rank {rank} {name}"
            else:
                torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-6, msg=f"{case} rank {rank} {name}")
    # The adapter: written once (rank 0), equal to the single-process one.
    assert not (out / f"{case}-adapter-rank1").exists(), "rank 1 wrote an adapter"
    ref_dir = out / f"{references.get(f'{case}-dir', case)}-reference"
    saved = load_file(out / f"{case}-adapter" / "sparseft_delta.safetensors")
    ref = load_file(ref_dir / "sparseft_delta.safetensors")
    assert saved.keys() == ref.keys()
    for key in ref:
        if ref[key].dtype == torch.int32:
            assert torch.equal(saved[key], ref[key]), f"{case} adapter {key}"
        else:
            torch.testing.assert_close(saved[key], ref[key], rtol=1e-5, atol=1e-6, msg=f"{case} adapter {key}")


@pytest.mark.parametrize("case", list(CONFIGS))
def test_ddp_two_ranks_equal_one_process_with_the_double_batch(results, case):
    check_case(*results, case)


@pytest.mark.parametrize("case", list(TRAIN_LOOP))
def test_sparseft_train_under_ddp(results, case):
    check_case(*results, case)


@pytest.mark.parametrize("case", list(TRAINER))
def test_trainer_with_sparse_callback_under_ddp(results, case):
    check_case(*results, case)


@pytest.mark.parametrize("case", list(FSDP2))
def test_fsdp2_two_ranks_equal_one_process(results, case):
    check_case(*results, case)


# ---- single-process checks of the glue (no process group) ------------------------------
def test_controller_marks_values_ignored_by_ddp_on_both_models_and_adds_no_anchor_alone():
    from sparseft.train import SparseController

    model = build("id3")
    controller = SparseController(model)
    names = set(model._ddp_params_and_buffers_to_ignore)
    assert names == {f"model.{n}.values" for n in model.target_names}
    assert set(model.model._ddp_params_and_buffers_to_ignore) == {f"{n}.values" for n in model.target_names}
    assert all(layer.ddp_anchor is None for layer in model.sparse_layers().values())  # one process: no anchor
    controller.train_begin(STEPS)
    assert controller.grad_sync.handles == []  # and no gradient hooks
    controller.train_end()


def test_anchor_only_when_nothing_dense_is_trained(monkeypatch):
    from sparseft.distributed import add_ddp_anchor

    assert not add_ddp_anchor(build("random"))  # the classifier head is trained densely
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun, before the group exists
    model = build("llama-trainer")
    from sparseft.train import SparseController

    SparseController(model)
    anchors = [layer.ddp_anchor for layer in model.sparse_layers().values() if layer.ddp_anchor is not None]
    assert len(anchors) == 1 and anchors[0].numel() == 0 and anchors[0].requires_grad
    assert model.dense_trainable_parameters() == []  # not in the optimizer, not counted
    assert not any(k.endswith("ddp_anchor") for k in model.adapter_tensors())
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    out = model(input_ids=ids).logits  # grad enabled: the anchor joins the graph, adds 0
    assert torch.equal(out.detach(), plain)
    out.sum().backward()
    assert anchors[0].grad is not None and anchors[0].grad.numel() == 0


def test_fully_shard_sparse_refuses_the_merge_drop_policy():
    model = build("dynamic-gradient")
    assert model.sparse_config.dynamic.drop_policy == "merge"
    with pytest.raises(ValueError, match="drop_policy='zero'"):
        fully_shard_sparse(model)
