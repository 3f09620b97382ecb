"""Run folders never lose work: no silent overwrite, Ctrl-C keeps a checkpoint, a
checkpoint belongs to its run, files are written whole with one mode."""
from __future__ import annotations

import json
import os
import signal
import stat

import pytest
from _tiny import sentiment_rows, tiny_bert_dir, write_rows
from safetensors.torch import load_file

from sparseft.app.cli import main
from sparseft.model import file_mode


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("runfolder")
    tiny_bert_dir(d / "bert")
    write_rows(d / "train.jsonl", sentiment_rows(64, seed=1))
    write_rows(d / "eval.jsonl", sentiment_rows(16, seed=2))
    return d


def train_args(d, out, *extra):
    return ["train", "--model", str(d / "bert"), "--train-file", str(d / "train.jsonl"), "--eval-file",
            str(d / "eval.jsonl"), "--batch-size", "8", "--max-steps", "8", "--density", "0.05", "--out", str(out),
            "--no-progress", *extra]


def adapter(out):
    return load_file(str(out / "adapter" / "sparseft_delta.safetensors"))


def interrupt_at(monkeypatch, step):
    """A real SIGINT, delivered to this process while step ``step`` finishes."""
    from sparseft.train import SparseController

    original = SparseController.after_optimizer_step

    def after(self, s, batch=None, optimizer=None):
        original(self, s, batch, optimizer)
        if s == step:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(SparseController, "after_optimizer_step", after)


def test_a_folder_holding_a_run_is_refused_unless_overwrite(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(setup, out)) == 0
    before = (out / "metrics.json").read_text()
    capsys.readouterr()
    assert main(train_args(setup, out, "--lr", "0.01")) == 2
    err = capsys.readouterr().err
    assert "holds a run already" in err and "--overwrite" in err and f"sparseft train --resume {out}" in err
    assert (out / "metrics.json").read_text() == before
    assert main(train_args(setup, out, "--lr", "0.01", "--overwrite")) == 0
    assert json.loads((out / "metrics.json").read_text())["lr"] == 0.01


def test_an_unrelated_folder_is_fine(setup, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(train_args(setup, tmp_path)) == 0
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_sigint_without_save_every_then_resume_is_bit_identical(setup, tmp_path, monkeypatch, capsys):
    assert main(train_args(setup, tmp_path / "full")) == 0
    interrupted = tmp_path / "stopped"
    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        assert main(train_args(setup, interrupted)) == 130
    err = capsys.readouterr().err
    assert "interrupted after step 3 of 8" in err
    assert f"continue with: sparseft train --resume {interrupted}" in err
    assert not (interrupted / "metrics.json").exists()
    assert (interrupted / "checkpoints" / "checkpoint-3").is_dir()
    assert signal.getsignal(signal.SIGINT) is handler  # the loop put the handler back

    assert main(["train", "--resume", str(interrupted)]) == 0
    assert f"resuming {interrupted} at step 3 of 8" in capsys.readouterr().out
    metrics = json.loads((interrupted / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["resumed_from"].endswith("checkpoint-3")
    a, b = adapter(tmp_path / "full"), adapter(interrupted)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key


def test_a_checkpoint_of_other_settings_is_refused(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        assert main(train_args(setup, out)) == 130
    spec = json.loads((out / "run_spec.json").read_text())
    spec["training"]["lr"] = 0.5  # the folder now describes another run than its checkpoint's
    (out / "run_spec.json").write_text(json.dumps(spec))
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "training.lr" in err and "--overwrite" in err
    assert not (out / "metrics.json").exists()


def test_resume_without_a_checkpoint_says_why(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(setup, out)) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_metrics_and_adapter_files_share_the_ordinary_mode(setup, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(setup, out)) == 0
    files = [out / "metrics.json", out / "run_spec.json", *sorted((out / "adapter").iterdir())]
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
    assert set(modes.values()) == {file_mode()}, modes
    assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]


def test_checkpoints_by_time(setup, tmp_path, monkeypatch):
    """--save-minutes: a checkpoint once that much time has passed (clock faked)."""
    import importlib

    train_module = importlib.import_module("sparseft.train")  # the module, not sparseft.train the function

    clock = iter(range(0, 10_000, 50))  # 50 s per call of time.monotonic
    monkeypatch.setattr(train_module, "_monotonic", lambda: float(next(clock)))
    out = tmp_path / "run"
    assert main(train_args(setup, out, "--save-minutes", "2", "--keep-checkpoints", "10")) == 0
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
    assert steps and steps == list(range(steps[0], 9, steps[0])) and 1 < steps[0] < 8
