"""Shared fixtures: tiny randomly initialised models built from configs (no downloads)."""
from __future__ import annotations

import os

import pytest
import torch

# The test models are tiny: intra-op threads only add OpenMP spin-waiting, which on a
# busy 2-core machine made this suite 4x slower (40 s vs 9 s). Override for experiments.
torch.set_num_threads(int(os.environ.get("SPARSEFT_TEST_THREADS", "1")))

# Without a GPU, Triton runs only in its interpreter (tests/test_triton.py). The mode is
# read when a function is decorated, and triton.language's own helpers (tl.sum, ...) are
# decorated when triton is first imported, which torch._dynamo does as a side effect of
# other tests' imports: set it before anything can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 100
HIDDEN = 32
LAYERS = 2


def _randomize_biases(model, seed: int):
    """Fresh HF init sets every bias to zero; pretrained checkpoints have nonzero ones.
    Random biases keep bias-handling differences from hiding behind zeros."""
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def build_bert(hidden: int = HIDDEN, seed: int = 0, num_labels: int = 3):
    """A tiny BertForSequenceClassification, seeded, in eval mode (no dropout)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg)
    return _randomize_biases(model, seed).eval()


def build_gpt2(hidden: int = HIDDEN, seed: int = 0):
    """A tiny GPT2LMHeadModel (Conv1D layers, tied lm_head), seeded, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=hidden,
        n_layer=LAYERS,
        n_head=2,
        n_positions=64,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    return _randomize_biases(model, seed).eval()


def make_batch(batch: int = 2, seq: int = 7, seed: int = 123):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, -2:] = 0  # some padding, so masking paths run too
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture
def bert_factory():
    """Call it to get a fresh tiny BERT; equal seeds give equal weights."""
    return build_bert


@pytest.fixture
def gpt2_factory():
    """Call it to get a fresh tiny GPT-2; equal seeds give equal weights."""
    return build_gpt2


@pytest.fixture
def tiny_bert():
    return build_bert()


@pytest.fixture
def tiny_gpt2():
    return build_gpt2()


@pytest.fixture
def batch():
    return make_batch()


def tiny_one_layer_bert(seed=0):
    """A one-layer classifier without dropout, for method tests that train a few steps."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_bert_classifier(seed=0, **config):
    """A two-layer BERT classifier (2 labels); ``config`` overrides BertConfig fields (e.g. dropout)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=2, **config)
    return BertForSequenceClassification(cfg)


def tiny_llama(seed=0, hidden=64):
    """A two-layer Llama causal LM (vocabulary 64, grouped-query attention, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


class RowsDataset(torch.utils.data.Dataset):
    """A map-style dataset over a list of example dicts (what transformers.Trainer takes)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def rows_of(batches):
    """The examples of ``batches`` (dicts of stacked tensors) as one dict per example."""
    return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]


def toy_batches(n_batches, batch_size=8, seed=0, seq_len=10):
    """A learnable toy task: label 1 puts token 7 at position 3."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(8, 50, (batch_size, seq_len), generator=gen)
        labels = torch.randint(0, 2, (batch_size,), generator=gen)
        ids[labels == 1, 3] = 7
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out
