"""Your own data: the validation split learning rates are chosen on is never the test file,
unless asked. It is --validation-file, or rows carved (seeded) out of the training file."""
import json

import pytest

from _tiny import sentiment_rows, tiny_run_folder, write_rows
from sparseft.app import data
from sparseft.app.cli import main
from sparseft.app.data import DataError
from sparseft.app.lmtasks import generation_task_from_files
from sparseft.app.run_folder import read_spec
from sparseft.app.spec import spec_from_dict, task_options_from_dict
from sparseft.app.tasks import task_from_files


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tiny_run_folder(tmp_path_factory.mktemp("tiny"), train_rows=40, eval_rows=12)
    write_rows(d / "validation.jsonl", sentiment_rows(6, seed=7))
    return d


def test_carving_is_seeded_disjoint_and_keeps_the_file_order():
    rows = list(range(200))
    train, validation = data.carve_validation(rows, 0.1, seed=3)
    assert len(validation) == 20 and len(train) == 180
    assert sorted(train + validation) == rows and not set(train) & set(validation)
    assert train == sorted(train) and validation == sorted(validation)
    assert data.carve_validation(rows, 0.1, seed=3) == (train, validation)  # every run of a seed: the same rows
    assert data.carve_validation(rows, 0.1, seed=4)[1] != validation


def test_carving_is_capped_and_needs_rows_to_spare():
    assert len(data.carve_validation(list(range(30_000)), 0.1, seed=0)[1]) == data.VALIDATION_CAP
    assert len(data.carve_validation(list(range(4)), 0.1, seed=0)[1]) == 1  # at least one row
    with pytest.raises(DataError, match="--validation-file"):
        data.carve_validation([1], 0.1, seed=0)
    with pytest.raises(DataError, match="between 0 and 1"):
        data.carve_validation(list(range(10)), 1.5, seed=0)


def test_task_from_files_takes_validation_from_the_file_the_carve_or_the_eval_file(folders):
    train_file, eval_file, val_file = (str(folders / f"{n}.jsonl") for n in ("train", "eval", "validation"))
    rows = data.read_table(train_file)[0]
    evaluation = data.read_table(eval_file)[0]

    carved = task_from_files(train_file, eval_file, validation_split=0.1, seed=5)
    assert carved.validation_source == "carved from train"
    assert (carved.train, carved.validation) == tuple(data.carve_validation(rows, 0.1, seed=5))
    assert carved.test == evaluation

    given = task_from_files(train_file, eval_file, validation_file=val_file, validation_split=0.1)
    assert given.validation_source == "file" and given.train == rows and len(given.validation) == 6
    assert given.validation[0].label in (0, 1)  # mapped with the training file's label names

    old = task_from_files(train_file, eval_file, validation_split=0.0)
    assert old.validation_source == "eval file" and old.validation == old.test == evaluation and old.train == rows

    pairs = generation_task_from_files(train_file, eval_file, validation_split=0.1, seed=5)
    assert pairs.validation_source == "carved from train"
    assert [p.group for p in pairs.validation] == [e.group for e in carved.validation]  # same rows on both paths


def run(folders, out, *extra):
    argv = ["train", "--model", str(folders / "bert"), "--train-file", str(folders / "train.jsonl"), "--eval-file",
            str(folders / "eval.jsonl"), "--batch-size", "8", "--max-steps", "2", "--out", str(out), "--no-progress",
            *extra]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def test_metrics_record_where_validation_came_from(folders, tmp_path):
    carved = run(folders, tmp_path / "carved")
    assert carved["validation_data"] == {"source": "carved from train", "examples": 4}
    assert carved["validation_score"] == carved["validation"]["accuracy"]  # the keys sweep and plot read
    assert "score" in carved and "test" in carved

    given = run(folders, tmp_path / "given", "--validation-file", str(folders / "validation.jsonl"))
    assert given["validation_data"] == {"source": "file", "examples": 6}

    off = run(folders, tmp_path / "off", "--no-validation-split")
    assert off["validation_data"] == {"source": "eval file", "examples": 12}
    assert off["validation"] == off["test"]


def test_causal_runs_carve_too(folders, tmp_path):
    out = tmp_path / "lm"
    assert main(["train", "--model", str(folders / "llama"), "--train-file", str(folders / "train.jsonl"),
                 "--eval-file", str(folders / "eval.jsonl"), "--prompt-column", "prompt", "--target-column", "target",
                 "--max-new-tokens", "2", "--batch-size", "8", "--max-steps", "1", "--validation-split", "0.25",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["validation_data"] == {"source": "carved from train",
                                                                                 "examples": 10}


def test_the_run_spec_records_the_validation_options(folders, tmp_path):
    run(folders, tmp_path / "r", "--validation-split", "0.2")
    recorded = read_spec(tmp_path / "r")["data"]
    assert recorded["validation_split"] == 0.2 and recorded["validation_file"] is None
    assert spec_from_dict(read_spec(tmp_path / "r")).data.validation_split == 0.2


def test_records_from_before_the_split_keep_validating_on_the_eval_file():
    old = {"task": "mine", "train_file": "a.csv", "eval_file": "b.csv"}
    assert task_options_from_dict(old).validation_split == 0.0
    assert task_options_from_dict({**old, "validation_split": 0.1}).validation_split == 0.1


def test_validation_file_without_own_data_is_refused(folders, tmp_path, capsys):
    assert main(["train", "--model", str(folders / "bert"), "--validation-file", str(folders / "validation.jsonl"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "--validation-file is for your own data" in capsys.readouterr().err
