"""``sparseft export``: rebuild a saved adapter on its base model and write it for other tools."""
from __future__ import annotations

from pathlib import Path

from ..export import save_merged, save_peft
from ..model import SparseModel, read_adapter
from .pretrained import DEFAULT_MODEL, load_causal_lm, load_classifier, resolve_model_dir


def export_adapter(adapter: str, merged: str | None = None, peft: str | None = None, model: str | None = None,
                   force: bool = False) -> list[Path]:
    """Write the adapter merged into its base model (``merged``: a plain transformers
    folder) and/or as a peft Super-Tuning adapter (``peft``). The base model is the one
    recorded with the adapter unless ``model`` is given."""
    if not merged and not peft:
        raise ValueError("give --merged DIR and/or --peft DIR")
    meta, _ = read_adapter(adapter)
    name = model or meta.get("sparseft_run", {}).get("model", DEFAULT_MODEL)
    base_info = meta["base_model"]
    is_classifier = bool(meta.get("modules_to_save")) or any(
        a.endswith("ForSequenceClassification") for a in base_info.get("architectures") or [])
    if is_classifier:
        base, tokenizer, _ = load_classifier(name, base_info.get("num_labels") or 2)
    else:
        base, tokenizer = load_causal_lm(name)
    sparse = SparseModel.from_pretrained(base, adapter, force=force)
    written = []
    if merged:
        written.append(save_merged(sparse, merged, tokenizer))
    if peft:
        written.append(save_peft(sparse, peft, base_model_name_or_path=str(resolve_model_dir(name))))
    return written
