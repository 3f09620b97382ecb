"""Adapter files from strangers: every malformed file ends in AdapterError, never a
crash, a hang, or a silently wrong model. A small seeded fuzzer over safetensors bytes
and sparseft_config.json fields (hypothesis is not a dependency)."""
import json
import random
import struct
import time

import pytest
import torch

from conftest import build_bert
from sparseft import AdapterError, SparseConfig, SparseModel, get_sparse_model
from sparseft.model import CONFIG_NAME, WEIGHTS_NAME, file_sha256


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    model = get_sparse_model(build_bert(), SparseConfig(method="random", density=0.05))
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.values.normal_()
    model.save_pretrained(folder)
    return folder


def _install(folder, weights: bytes, meta: dict, restamp: bool):
    (folder / WEIGHTS_NAME).write_bytes(weights)
    if restamp:
        meta = dict(meta, weights_sha256=file_sha256(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def _load_must_fail_cleanly_or_be_valid(folder):
    started = time.perf_counter()
    try:
        model = SparseModel.from_pretrained(build_bert(), folder)
    except AdapterError:
        return "refused"
    finally:
        assert time.perf_counter() - started < 10, "loading hung"
    for layer in model.sparse_layers().values():  # whatever loaded obeys every invariant
        idx = layer.indices
        assert idx.dtype == torch.int32 and bool((idx[1:] > idx[:-1]).all())
        assert int(idx.min()) >= 0 and int(idx.max()) < layer.weight.numel()
        assert bool(torch.isfinite(layer.values).all())
    return "loaded"


def _mutations(data: bytes, rng: random.Random):
    header_len = struct.unpack("<Q", data[:8])[0]
    for _ in range(100):
        kind = rng.choice(["flip-header", "flip-any", "truncate", "header-length", "splice-json"])
        buf = bytearray(data)
        if kind == "flip-header":
            pos = rng.randrange(8, 8 + header_len)
            buf[pos] = rng.randrange(256)
        elif kind == "flip-any":
            pos = rng.randrange(len(buf))
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            buf = buf[: rng.randrange(len(buf))]
        elif kind == "header-length":
            buf[:8] = struct.pack("<Q", rng.choice([0, 1, header_len + 1, len(data), 2**31, 2**63 - 1]))
        else:  # rewrite a random dtype/shape/offset in the JSON header, keeping it valid JSON
            header = json.loads(bytes(buf[8:8 + header_len]))
            key = rng.choice([k for k in header if k != "__metadata__"])
            field = rng.choice(["dtype", "shape", "data_offsets"])
            header[key][field] = rng.choice({
                "dtype": ["I64", "F16", "BOOL", "U8", "F64", "XYZ"],
                "shape": [[], [0], [10**12], [2, 3], [-1]],
                "data_offsets": [[0, 0], [0, 10**12], [5, 1], [0, 3]],
            }[field])
            raw = json.dumps(header).encode()
            buf = bytearray(struct.pack("<Q", len(raw)) + raw + bytes(buf[8 + header_len:]))
        yield kind, bytes(buf)


def test_fuzzed_weight_files_are_refused_or_valid(good_adapter, tmp_path):
    data = (good_adapter / WEIGHTS_NAME).read_bytes()
    meta = json.loads((good_adapter / CONFIG_NAME).read_text())
    rng = random.Random(1234)
    outcomes = {"refused": 0, "loaded": 0}
    for kind, mutated in _mutations(data, rng):
        if mutated == data:
            continue
        # Unstamped: the checksum catches every change.
        _install(tmp_path, mutated, meta, restamp=False)
        assert _load_must_fail_cleanly_or_be_valid(tmp_path) == "refused", kind
        # Stamped (a careful hostile author): the structural checks must hold on their own.
        _install(tmp_path, mutated, meta, restamp=True)
        outcomes[_load_must_fail_cleanly_or_be_valid(tmp_path)] += 1
    assert outcomes["refused"] > 60


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["sparse_config"].update(surprise=1), "unknown config field"),
    (lambda m: m["sparse_config"].update(density="lots"), "density"),
    (lambda m: m["sparse_config"].update(method="magic"), "not known"),
    (lambda m: m.update(targets={"bert.pooler.dense": [32]}), "targets"),
    (lambda m: m.update(targets=[]), "targets"),
    (lambda m: m.update(modules_to_save="classifier"), "modules_to_save"),
    (lambda m: m.update(format_version=99), "format_version"),
    (lambda m: m.pop("weights_sha256"), "weights_sha256"),
    (lambda m: m.pop("sparse_config"), "not a sparseft adapter"),
    (lambda m: m["base_model"].update(fingerprint="0" * 16), "fingerprint"),
], ids=["unknown-field", "bad-density", "bad-method", "bad-shape", "targets-list", "heads-str",
        "format", "no-checksum", "no-config", "fingerprint"])
def test_hostile_config_fields(good_adapter, tmp_path, edit, message):
    meta = json.loads((good_adapter / CONFIG_NAME).read_text())
    edit(meta)
    _install(tmp_path, (good_adapter / WEIGHTS_NAME).read_bytes(), meta, restamp=False)
    with pytest.raises(AdapterError, match=message):
        SparseModel.from_pretrained(build_bert(), tmp_path)


def test_config_that_is_not_an_object(good_adapter, tmp_path):
    (tmp_path / WEIGHTS_NAME).write_bytes((good_adapter / WEIGHTS_NAME).read_bytes())
    for text in ["[]", "null", "42", '"x"', "\xff\xfe"]:
        (tmp_path / CONFIG_NAME).write_text(text, encoding="latin-1")
        with pytest.raises(AdapterError):
            SparseModel.from_pretrained(build_bert(), tmp_path)
