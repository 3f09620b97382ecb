"""One pipeline for every ``sparseft train`` run: sparse or baseline, classification or
causal LM, on tiny on-disk models. Same checkpoint/resume, same calibration order, same
metrics.json fields, and ``sparseft eval`` re-scores every adapter train writes."""
import json

import pytest
import torch
from safetensors.torch import load_file

from _tiny import tiny_run_folder
from sparseft.app import runner
from sparseft.app.cli import main
from sparseft.app.prepare import calibration_order, prepare
from sparseft.app.spec import RunSpec, TaskOptions
from sparseft.train import SparseController, TrainingArguments

pytest.importorskip("peft")

# fields that are measured (time, memory) or name the run, not what it computed
MEASURED = {"step_time_s", "tokens_per_s", "train_seconds", "selection_seconds", "peak_rss_mb", "train_peak_rss_mb",
            "selection_extra_rss_mb", "resumed_from", "threads"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_run_folder(tmp_path_factory.mktemp("tiny"))


def classification_args(folders, out, *extra):
    return ["train", "--model", str(folders / "bert"), "--train-file", str(folders / "train.jsonl"),
            "--eval-file", str(folders / "eval.jsonl"), "--batch-size", "8", "--out", str(out), "--no-progress", *extra]


def causal_args(folders, out, *extra):
    return ["train", "--model", str(folders / "llama"), "--train-file", str(folders / "train.jsonl"),
            "--eval-file", str(folders / "eval.jsonl"), "--prompt-column", "prompt", "--target-column", "target",
            "--max-new-tokens", "2", "--batch-size", "8", "--out", str(out), "--no-progress", *extra]


def kill_after_step(monkeypatch, step):
    original = SparseController.after_optimizer_step

    def die(self, s, batch=None, optimizer=None):
        original(self, s, batch, optimizer)
        if s == step:
            raise KeyboardInterrupt  # as if the process had been killed
    monkeypatch.setattr(SparseController, "after_optimizer_step", die)


def computed(metrics):
    return {k: v for k, v in metrics.items() if k not in MEASURED}


def adapter_tensors(run_dir):
    folder = run_dir / "adapter"
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no adapter weights in {folder}"
    return {f"{f.name}/{k}": v for f in files for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("kind", ["causal-sparse", "causal-lora", "classification-lora"])
def test_killed_and_resumed_run_matches_the_uninterrupted_one(folders, tmp_path, monkeypatch, kind):
    task, method = kind.split("-")
    build = causal_args if task == "causal" else classification_args
    extra = ["--method", "gradient" if method == "sparse" else "lora", "--match-lora-rank", "1", "--max-steps", "8",
             "--calib-examples", "12", "--save-every", "2", "--keep-checkpoints", "1"]
    assert main(build(folders, tmp_path / "whole", *extra)) == 0

    kill_after_step(monkeypatch, 5)
    assert main(build(folders, tmp_path / "killed", *extra)) == 130
    monkeypatch.undo()
    assert not (tmp_path / "killed" / "metrics.json").exists()
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0

    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert resumed["resumed_from"].endswith("checkpoint-4") and whole["resumed_from"] is None
    assert computed(resumed) == computed(whole)
    assert resumed["steps"] == 8 and resumed["final_train_loss"] == whole["final_train_loss"]
    a, b = adapter_tensors(tmp_path / "whole"), adapter_tensors(tmp_path / "killed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    again = runner.evaluate_adapter(str(tmp_path / "killed" / "adapter"))  # `sparseft eval`
    assert again["score"] == pytest.approx(whole["score"], abs=1e-9) and again["metric"] == whole["metric"]


def test_eval_command_rescores_a_baseline_adapter(folders, tmp_path, capsys):
    assert main(classification_args(folders, tmp_path / "run", "--method", "lora", "--lora-rank", "2",
                                     "--max-steps", "3")) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--adapter", str(tmp_path / "run" / "adapter")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["score"] == pytest.approx(metrics["score"], abs=1e-9)
    assert result["test"]["loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-6)


def test_every_kind_of_run_writes_the_same_metrics_fields(folders, tmp_path):
    runs = {
        "sparse-classification": classification_args(folders, tmp_path / "a", "--method", "random"),
        "baseline-classification": classification_args(folders, tmp_path / "b", "--method", "lora"),
        "sparse-causal": causal_args(folders, tmp_path / "c", "--method", "gradient", "--calib-examples", "4"),
        "full-causal": causal_args(folders, tmp_path / "d", "--method", "full"),
    }
    keys = {}
    for name, argv in runs.items():
        assert main(argv + ["--max-steps", "2"]) == 0, name
        keys[name] = set(json.loads((tmp_path / argv[argv.index("--out") + 1] / "metrics.json").read_text()))
    expected = keys["sparse-classification"]
    assert {"selection_extra_rss_mb", "selection_peak_gpu_mb", "calibration_examples", "folded_params",
            "mask_updates", "resumed_from", "higher_is_better", "majority_rate"} <= expected
    for name, found in keys.items():
        assert found == expected, (name, found ^ expected)
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["calibration_examples"] == 4


def test_classification_and_causal_runs_calibrate_on_the_same_seeded_examples_shortest_first(folders, tmp_path, monkeypatch):
    seen = []
    real = runner.get_sparse_model

    def spy(base, config, calibration_data=None):
        seen.append(calibration_data)
        return real(base, config, calibration_data=calibration_data)
    monkeypatch.setattr(runner, "get_sparse_model", spy)
    common = ["--method", "gradient", "--calib-examples", "10", "--calib-batch-size", "4", "--seed", "3",
              "--max-steps", "1"]
    assert main(classification_args(folders, tmp_path / "cls", *common)) == 0
    assert main(causal_args(folders, tmp_path / "lm", *common)) == 0
    kept = 48 - 5  # the training file's rows less the validation rows carved out of it (10 %)
    order = calibration_order(kept, 10, seed=3)
    assert order == torch.randperm(kept, generator=torch.Generator().manual_seed(3))[:10].tolist()
    assert order != list(range(10))  # not simply the first examples
    for batches, data in zip(seen, (
        TaskOptions(train_file=str(folders / "train.jsonl"), eval_file=str(folders / "eval.jsonl"), batch_size=8),
        TaskOptions(train_file=str(folders / "train.jsonl"), eval_file=str(folders / "eval.jsonl"), batch_size=8,
                    prompt_column="prompt", target_column="target"),
    )):
        model = folders / ("llama" if data.prompt_column else "bert")
        loader = prepare(RunSpec(out="", model=str(model), data=data, training=TrainingArguments(seed=3))).train_loader
        assert len(loader.dataset) == kept  # one training sequence per example on both paths
        chosen = [loader.dataset[i] for i in order]
        lengths = [loader.collate_fn([e])["input_ids"].shape[-1] for e in chosen]
        by_length = [e for _, _, e in sorted(zip(lengths, range(len(chosen)), chosen), key=lambda t: t[:2])]
        expected = list(torch.utils.data.DataLoader(by_length, batch_size=4, collate_fn=loader.collate_fn))
        assert [b["input_ids"].shape[-1] for b in batches] == sorted(b["input_ids"].shape[-1] for b in batches)
        assert [len(b["labels"]) for b in batches] == [4, 4, 2]
        for got, want in zip(batches, expected):
            assert got.keys() == want.keys()
            for key in got:
                assert torch.equal(got[key], want[key]), key


def test_a_sweep_resumes_a_stopped_run_from_its_checkpoint(folders, tmp_path, monkeypatch):
    from sparseft.app.sweep import run_sweep

    grid = {"out": str(tmp_path / "out"), "isolate": False, "methods": ["lora"], "budgets": [{"match_lora_rank": 1}],
            "base": {"model": str(folders / "bert"), "train_file": str(folders / "train.jsonl"),
                     "eval_file": str(folders / "eval.jsonl"), "max_steps": 6, "batch_size": 8, "save_every": 2}}
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    kill_after_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tmp_path / "grid.json", log=lambda line: None)
    monkeypatch.undo()
    lines = []
    run_sweep(tmp_path / "grid.json", log=lines.append)
    assert any("resuming from its newest checkpoint" in line for line in lines)
    metrics = json.loads((tmp_path / "out" / "lora-r1-s0" / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["resumed_from"].endswith("checkpoint-2")
