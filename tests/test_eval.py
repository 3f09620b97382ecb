"""`sparseft eval` reads every adapter `train` writes, and re-scores it exactly."""
import json

import pytest
from _tiny import tiny_run_folder

from sparseft.app.cli import main

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_folder(tmp_path_factory.mktemp("eval"), train_rows=32, seeds=(1, 2))


def train(d, out, model, *extra):
    return main(["train", "--model", str(d / model), "--train-file", str(d / "train.jsonl"), "--eval-file",
                 str(d / "eval.jsonl"), "--batch-size", "8", "--max-steps", "4", "--out", str(out), "--no-progress", *extra])


@pytest.mark.parametrize("method", ["lora", "random"])
def test_eval_reproduces_the_test_score_of_a_classifier_run(setup, tmp_path, capsys, method):
    out = tmp_path / method
    assert train(setup, out, "bert", "--method", method, "--match-lora-rank", "2", "--lr", "0.01") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "adapter")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["score"] == pytest.approx(metrics["score"], abs=1e-9)
    assert result["test"]["loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-5)


def test_eval_reads_a_lora_run_on_a_causal_lm(setup, tmp_path, capsys):
    out = tmp_path / "gen"
    assert train(setup, out, "llama", "--method", "lora", "--lora-rank", "2", "--prompt-column", "prompt",
                 "--target-column", "target") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out)]) == 0  # the run folder will do
    assert json.loads(capsys.readouterr().out)["score"] == pytest.approx(metrics["score"], abs=1e-9)


def test_eval_of_a_full_fine_tune_says_why_not(setup, tmp_path, capsys):
    out = tmp_path / "full"
    assert train(setup, out, "bert", "--method", "full", "--lr", "1e-4") == 0
    assert main(["eval", "--adapter", str(out)]) == 2
    assert "saves no adapter" in capsys.readouterr().err


def test_errors_name_their_likely_fix(setup, tmp_path, capsys):
    assert main(["train", "--task", "rt-gen", "--out", str(tmp_path / "gen2")]) == 2
    err = capsys.readouterr().err
    assert "--task rt-gen needs a causal LM" in err and "try --model smollm2" in err

    (tmp_path / "mine.csv").write_text("review,sentiment\ngood film,pos\nbad film,neg\n")
    assert main(["train", "--model", str(setup / "bert"), "--train-file", str(tmp_path / "mine.csv"),
                 "--eval-file", str(tmp_path / "mine.csv"), "--out", str(tmp_path / "mine")]) == 2
    err = capsys.readouterr().err
    assert "columns are review, sentiment" in err and "--text-column" in err
