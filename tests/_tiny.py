"""Tiny model folders on disk (random init, word-level tokenizer): what `--model <dir>`
loads in tests, with no downloads."""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("good great fine bad awful poor movie film plot actor story the a is was very not and "
         "positive negative answer review what yes no one two three four five plus equals").split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", eos_token="[EOS]")


def tiny_bert_dir(path: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel

    tok = _tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_llama_dir(path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    pos, neg = ["good", "great", "fine"], ["bad", "awful", "poor"]
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(pos if label else neg), rng.choice(["movie", "film", "plot", "story"]), "was", "very"]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if label else "neg",
                     "prompt": "review " + " ".join(words), "target": "positive" if label else "negative"})
    return rows


def tiny_run_folder(d: Path, train_rows: int = 48, eval_rows: int = 16, seeds: tuple[int, int] = (0, 1)) -> Path:
    """A tiny BERT, a tiny Llama and train/eval JSONL files of sentiment rows, under ``d``."""
    tiny_bert_dir(d / "bert")
    tiny_llama_dir(d / "llama")
    write_rows(d / "train.jsonl", sentiment_rows(train_rows, seed=seeds[0]))
    write_rows(d / "eval.jsonl", sentiment_rows(eval_rows, seed=seeds[1]))
    return d
