"""Load base models from local folders (or the embedded default) with no downloads."""
from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from .data import DataError, default_encoder_dir

DEFAULT_MODEL = "default"


def resolve_model_dir(model: str) -> Path:
    """``default`` is the embedded all-MiniLM-L6-v2; anything else must be a local HF folder."""
    if model == DEFAULT_MODEL:
        return default_encoder_dir()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise DataError(f"--model {model!r} is not a local Hugging Face model folder (no config.json there); "
                        "nothing is downloaded at run time")
    return path


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_classifier(model: str, num_labels: int) -> tuple[nn.Module, object, list[str]]:
    """(model, tokenizer, new_heads): a sequence classifier and the top-level modules the
    checkpoint did not have (newly initialised, so trained densely)."""
    _quiet_transformers()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = resolve_model_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    net, info = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=num_labels, output_loading_info=True
    )
    if net.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        net.config.pad_token_id = tokenizer.pad_token_id
    missing = set(info.get("missing_keys", ()))
    # Keys missing inside the pretrained body stay frozen; only new top-level heads train.
    body = getattr(net, "base_model_prefix", "")
    new_heads = sorted({key.split(".")[0] for key in missing} - {body})
    return net.eval(), tokenizer, new_heads
