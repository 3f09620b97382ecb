"""An adapter knows the base weights it was trained on: other weights of the same shapes
are warned about, and refused when loading strictly."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import build_bert

import sparseft
from sparseft.model import AdapterError, weights_fingerprint


def saved_adapter(tmp_path):
    model = sparseft.get_sparse_model(build_bert(seed=0), sparseft.SparseConfig(method="random", density=0.05))
    with torch.no_grad():
        for p in model.sparse_parameters():
            p.normal_()
    return model.save_pretrained(tmp_path / "adapter")


def noisy_bert(scale=1e-2):
    """The same architecture and names as the adapter's base, other weights (as a fine-tuned copy has)."""
    model = build_bert(seed=0)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def test_the_same_weights_load_quietly(tmp_path):
    path = saved_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparseft.SparseModel.from_pretrained(build_bert(seed=0), path, strict=True)


def test_other_weights_warn_and_strict_refuses(tmp_path):
    path = saved_adapter(tmp_path)
    with pytest.warns(UserWarning, match="other base weights"):
        sparseft.SparseModel.from_pretrained(noisy_bert(), path)
    with pytest.raises(AdapterError, match="strict"):
        sparseft.SparseModel.from_pretrained(noisy_bert(), path, strict=True)
    with warnings.catch_warnings():  # force: the user said so
        warnings.simplefilter("error")
        sparseft.SparseModel.from_pretrained(noisy_bert(), path, force=True)


def test_the_fingerprint_reads_the_weights_not_only_shapes():
    a, b = build_bert(seed=0), build_bert(seed=0)
    names = [n for n, m in a.named_modules() if isinstance(m, torch.nn.Linear)]
    assert weights_fingerprint(a, names) == weights_fingerprint(b, names)
    assert weights_fingerprint(a, names) == weights_fingerprint(a.to(torch.bfloat16), names)  # one checkpoint, two dtypes
    with torch.no_grad():
        b.get_submodule(names[3]).weight[0, 0] += 1.0  # position 0 is always sampled
    assert weights_fingerprint(a.float(), names) != weights_fingerprint(b, names)


def test_the_fingerprint_is_taken_before_dynamic_folds(tmp_path):
    """A reloaded adapter with folded entries matches the pristine base it came from."""
    base = build_bert(seed=0)
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    before = weights_fingerprint(base, names)
    model = sparseft.get_sparse_model(base, sparseft.SparseConfig(method="random", density=0.05))
    assert model.weights_fingerprint == weights_fingerprint(build_bert(seed=0), model.target_names)
    assert before == weights_fingerprint(build_bert(seed=0), names)
