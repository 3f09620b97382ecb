"""What train tells the user: short plans, calibration, validation scores during training."""
from dataclasses import replace

from _tiny import sentiment_rows, tiny_bert_dir, write_rows

from sparseft import TrainingArguments
from sparseft.app.cli import main
from sparseft.app.guard_rails import short_run_warnings


def test_a_short_plan_suggests_more_epochs():
    args = TrainingArguments()
    [message] = short_run_warnings(7, args)
    assert "only 7 optimizer steps" in message and "--epochs 8" in message
    assert short_run_warnings(7, replace(args, max_steps=7)) == []  # asked for explicitly
    assert short_run_warnings(400, args) == []


def test_few_examples_per_class_are_named():
    [message] = short_run_warnings(400, TrainingArguments(), labels=[0] * 100 + [1] * 5, label_names=["neg", "pos"])
    assert "pos: 5" in message and "neg" not in message


def test_train_warns_calibrates_aloud_and_prints_validation_scores(tmp_path, capsys):
    tiny_bert_dir(tmp_path / "bert")
    write_rows(tmp_path / "train.jsonl", sentiment_rows(32, seed=1))
    write_rows(tmp_path / "eval.jsonl", sentiment_rows(16, seed=2))
    code = main(["train", "--model", str(tmp_path / "bert"), "--train-file", str(tmp_path / "train.jsonl"),
                 "--eval-file", str(tmp_path / "eval.jsonl"), "--batch-size", "8", "--method", "gradient",
                 "--density", "0.05", "--eval-every", "2", "--out", str(tmp_path / "run")])
    assert code == 0
    out, err = capsys.readouterr()
    assert "warning: only 4 optimizer steps are planned" in err and "--epochs" in err
    assert "few training examples for some classes" in err
    # 32 rows less the 3 carved out for validation
    assert "calibrating: scoring entries with 'gradient' on 29 training examples (4 batches)" in err
    assert "step 2/4: validation accuracy" in out + err
    assert " on cpu |" in out
