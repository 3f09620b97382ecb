"""Sweeps, plots, causal-LM tasks and user files, end to end on tiny on-disk models (fast)."""
import json

import pytest

from _tiny import tiny_run_folder, write_rows
from sparseft.app.cli import main

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_run_folder(tmp_path_factory.mktemp("tiny"))


def test_two_run_sweep_writes_results_resumes_and_plots(folders, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    grid = {"out": str(tmp_path / "out"), "isolate": False, "methods": ["random", "lora"],
            "budgets": [{"match_lora_rank": 2}], "seeds": [0],
            "base": {"model": str(folders / "bert"), "train_file": str(folders / "train.jsonl"),
                     "eval_file": str(folders / "eval.jsonl"), "max_steps": 2, "batch_size": 8}}
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    assert main(["sweep", str(tmp_path / "grid.json")]) == 0
    results = tmp_path / "out" / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["random", "lora"]
    assert rows[0]["trainable_params"] == rows[1]["trainable_params"] > 0  # same budget, counted alike
    assert all(r["steps"] == 2 and "history" not in r for r in rows)
    # resume: nothing re-runs, nothing is appended twice
    assert main(["sweep", str(tmp_path / "grid.json")]) == 0
    assert "done already, skipped" in capsys.readouterr().out
    assert len(results.read_text().splitlines()) == 2
    assert main(["plot", str(results), "--out", str(tmp_path / "plots")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["train-cost.png", "train-score-vs-params.png"]
    assert (tmp_path / "plots" / "train-score-vs-params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (tmp_path / "plots" / "summary.md").read_text()
    assert "| lora | r2 |" in summary and "| random (default lr) | r2 |" in summary  # no --lr: the rule's rate
    assert "| train | random (default lr) | r2 |" in summary.split("Paired by seed")[1]
    grid["methods"] = ["lora"]
    (tmp_path / "lora.json").write_text(json.dumps(grid))
    assert main(["plot", str(results), "--out", str(tmp_path / "p2"), "--grid", str(tmp_path / "lora.json")]) == 0
    assert "| random |" not in (tmp_path / "p2" / "summary.md").read_text()


def test_summary_pairs_each_series_with_lora_by_seed():
    from sparseft.app.plot import paired_vs_lora, summarize

    def row(method, lr, seed, score, given=None):
        return {"task": "t", "method": method, "budget": "r4", "lr": lr, "lr_given": given or lr, "seed": seed,
                "score": score, "validation_score": score, "trainable_params": 10}
    rows = [row("lora", 1e-3, s, 0.70 + 0.01 * s) for s in (0, 1, 2)] + [
        row("lora", 1e-2, s, 0.60) for s in (0, 1, 2)] + [
        row("random", 5e-3, s, 0.72, "auto") for s in (0, 1, 2)] + [row("random", 2e-2, 0, 0.65)]
    summary = summarize(rows)
    assert {e["method"] for e in summary} == {"lora", "random", "random (default lr)"}
    paired = {p["method"]: p for p in paired_vs_lora(summary)}
    assert paired["random (default lr)"]["lora_lr"] == 1e-3  # LoRA at its best rate on validation
    assert paired["random (default lr)"]["diff_mean"] == pytest.approx(0.01)
    assert paired["random (default lr)"]["wins"] == 2 and paired["random"]["seeds"] == 1


def test_default_rate_is_compared_with_the_best_rate_tried_paired_by_seed():
    from sparseft.app.plot import default_table, default_vs_tuned

    def row(lr, seed, val, score, given=None):
        return {"task": "t", "method": "random", "budget": "r4", "lr": lr, "lr_given": given or lr, "seed": seed,
                "score": score, "validation_score": val, "trainable_params": 10}
    rows = [row(0.01, s, 0.70, 0.71 + 0.01 * s, "auto") for s in (0, 1, 2)] + [
        row(0.02, s, 0.75, 0.74) for s in (0, 1)] + [row(0.005, 0, 0.60, 0.90)]
    (e,) = default_vs_tuned(rows)
    assert e["default_lr"] == 0.01 and e["best_lr"] == 0.02  # chosen on validation, not test
    assert e["seeds"] == 2 and e["lrs_tried"] == [0.005, 0.01, 0.02]
    assert e["diff_mean"] == pytest.approx((0.71 - 0.74 + 0.72 - 0.74) / 2)
    assert "| t | random | r4 | 0.01 | 0.02 (of 0.005, 0.01, 0.02) | 2 |" in default_table([e])
    # the default rate can be the best one: its own runs are then the comparison
    (same,) = default_vs_tuned([row(0.01, 0, 0.8, 0.8, "auto"), row(0.02, 0, 0.7, 0.9)])
    assert same["best_lr"] == 0.01 and same["diff_mean"] == 0


def test_rate_table_bolds_one_best_rate_per_method_with_the_default_marked():
    from sparseft.app.plot import rate_table

    def row(lr, seed, val, given=None):
        return {"task": "t", "method": "gradient", "budget": "r16", "lr": lr, "lr_given": given or lr, "seed": seed,
                "score": val, "validation_score": val, "trainable_params": 10}
    rows = [row(0.0004, 0, 0.95, "auto"), row(0.0009, 0, 0.97), row(0.0003, 0, 0.90)]
    lines = [line for line in rate_table(rows).splitlines() if line.startswith("| t |")]
    assert [line.split(" | ")[3] for line in lines] == ["0.0003", "0.0004 (default)", "**0.0009**"]
    # when the default is the best on validation, it is the one in bold
    lines = rate_table([row(0.0004, 0, 0.99, "auto"), row(0.0009, 0, 0.97)]).splitlines()
    assert "| t | r16 | gradient | **0.0004** (default) | 1 | 0.9900 | 0.9900 |" in lines


def test_best_rate_is_judged_on_the_seeds_every_rate_ran():
    from sparseft.app.plot import best_rate, summarize

    def row(lr, seed, val):
        return {"task": "t", "method": "lora", "budget": "r4", "lr": lr, "lr_given": lr, "seed": seed,
                "score": val, "validation_score": val, "trainable_params": 10}
    # 0.004 won the sweep (seed 0); its later seeds scored lower, which must not hand the pick to 0.001
    rows = [row(0.001, 0, 0.96), row(0.004, 0, 0.98), row(0.004, 1, 0.94), row(0.004, 2, 0.93)]
    assert best_rate({0.001: {0: rows[0]}, 0.004: {s: r for s, r in zip((0, 1, 2), rows[1:])}}) == 0.004
    (entry,) = summarize(rows)
    assert entry["lr"] == 0.004 and entry["seeds"] == 3


def test_variants_run_each_grid_point_once_per_named_option_set(tmp_path):
    from sparseft.app.plot import summarize
    from sparseft.app.sweep import expand, load_grid

    grid = {"out": str(tmp_path / "out"), "methods": ["random"], "budgets": [{"match_lora_rank": 4}],
            "lrs": [0.01], "seeds": [0, 1], "base": {"task": "bbc-lm", "max_steps": 2},
            "variants": {"float": {}, "nf4": {"quantize": "nf4"}}}
    (tmp_path / "g.json").write_text(json.dumps(grid))
    runs = expand(load_grid(tmp_path / "g.json"))
    assert [r.name for r in runs] == ["random-r4-lr0.01-s0-float", "random-r4-lr0.01-s0-nf4",
                                      "random-r4-lr0.01-s1-float", "random-r4-lr0.01-s1-nf4"]
    assert [r.variant for r in runs] == ["float", "nf4", "float", "nf4"]
    assert ["--quantize", "nf4"] == runs[1].argv[-2:] and "--quantize" not in runs[0].argv
    assert "--task" in runs[0].argv and runs[0].argv[runs[0].argv.index("--out") + 1].endswith("-s0-float")
    rows = [{"task": "bbc-lm", "method": "random", "budget": "r4", "lr": 0.01, "seed": r.seed, "variant": r.variant,
             "score": 40.0 + (r.variant == "nf4"), "trainable_params": 10, "higher_is_better": False} for r in runs]
    assert sorted(e["method"] for e in summarize(rows)) == ["random [float]", "random [nf4]"]
    grid["variants"] = {"nf4": {"seed": 3}}
    (tmp_path / "g.json").write_text(json.dumps(grid))
    with pytest.raises(ValueError, match="'seed' belongs to the grid axes, not to variant 'nf4'"):
        expand(load_grid(tmp_path / "g.json"))
    grid["variants"] = ["nf4"]
    (tmp_path / "g.json").write_text(json.dumps(grid))
    with pytest.raises(ValueError, match="'variants' maps each variant's name"):
        load_grid(tmp_path / "g.json")


def test_bad_grid_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "g.json").write_text(json.dumps({"methods": ["random"], "budgets": [{"rank": 3}]}))
    assert main(["sweep", str(tmp_path / "g.json")]) == 2
    assert "each budget is one of" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_fix(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    (tmp_path / "r.jsonl").write_text(json.dumps({"method": "random", "score": 0.5, "trainable_params": 3}) + "\n")
    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert main(["plot", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "p")]) == 2
    assert "pip install 'sparseft[plot]'" in capsys.readouterr().err


def test_bad_results_line_is_named(tmp_path, capsys):
    (tmp_path / "r.jsonl").write_text(json.dumps({"method": "x", "score": 1, "trainable_params": 1}) + "\n{oops\n")
    assert main(["plot", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "p")]) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["random", "lora", "full"])
def test_generation_from_user_files_on_a_tiny_causal_lm(folders, tmp_path, method):
    out = tmp_path / method
    code = main(["train", "--model", str(folders / "llama"), "--train-file", str(folders / "train.jsonl"),
                 "--eval-file", str(folders / "eval.jsonl"), "--prompt-column", "prompt", "--target-column", "target",
                 "--max-new-tokens", "2", "--method", method, "--match-lora-rank", "1", "--max-steps", "2",
                 "--batch-size", "8", "--out", str(out), "--no-progress"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["metric"] == "exact_match" and 0 <= m["score"] <= 1 and m["majority_rate"] == 0.5
    assert m["head_params"] == 0 and m["trainable_params"] > 0
    assert len(m["test"]["examples"]) == 5 and {"target", "generated", "match"} <= m["test"]["examples"][0].keys()
    if method == "random":  # a sparse adapter re-scores to the same number
        from sparseft.app.runner import evaluate_adapter

        again = evaluate_adapter(str(out / "adapter"))
        assert again["score"] == m["score"] and again["metric"] == "exact_match"


def test_user_generation_file_errors_name_line_and_column(folders, tmp_path, capsys):
    write_rows(tmp_path / "bad.jsonl", [{"prompt": "a", "target": "b"}, {"prompt": "c", "answer": "d"}])
    code = main(["train", "--model", str(folders / "llama"), "--train-file", str(tmp_path / "bad.jsonl"),
                 "--eval-file", str(folders / "eval.jsonl"), "--prompt-column", "prompt", "--target-column", "target",
                 "--out", str(tmp_path / "x"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "'target'" in err and "Traceback" not in err


def test_lm_blocks_keep_every_token_and_mask_prompts(folders):
    from transformers import AutoTokenizer

    from sparseft.app.lmtasks import Pair, encode_training

    tok = AutoTokenizer.from_pretrained(folders / "llama")
    words = " ".join(["good movie"] * 10)  # 20 tokens + eos
    blocks = encode_training([Pair("", words, "g")], tok, max_length=8)
    assert [len(ids) for ids, _ in blocks] == [8, 8, 5] and all(ids == lab for ids, lab in blocks)
    (ids, labels), = encode_training([Pair("review " + words, "positive", "g")], tok, max_length=6)
    assert len(ids) == 6 and labels[:-2] == [-100] * 4 and labels[-1] == tok.eos_token_id


def test_normalize_answer():
    from sparseft.app.lmtasks import normalize_answer

    assert normalize_answer("  Positive.\nbecause") == "positive"
    assert normalize_answer("") == ""


def test_smollm2_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    from sparseft.app import pretrained
    from sparseft.app.data import DataError

    monkeypatch.setattr(pretrained, "SMOLLM2_PACKAGE", "no_such_package_xyz")
    with pytest.raises(DataError, match="not installed"):
        pretrained.smollm2_dir(cache=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_perplexity_in_slices_equals_the_whole_batch(tiny_gpt2, monkeypatch):
    import math

    import torch

    from sparseft.app import lmtasks

    gen = torch.Generator().manual_seed(0)
    items = []
    for length in (12, 9, 12, 5, 7):
        ids = torch.randint(0, tiny_gpt2.config.vocab_size, (length,), generator=gen).tolist()
        items.append((ids, [-100] * 2 + ids[2:]))
    batch = lmtasks.CausalCollator(pad_id=0)(items)
    with torch.no_grad():
        logits = tiny_gpt2(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    # a budget of two sequences' logits: the batch of five is scored in three slices
    monkeypatch.setattr(lmtasks, "EVAL_LOGITS_BUDGET", 2 * 12 * tiny_gpt2.config.vocab_size)
    result = lmtasks.evaluate_perplexity(tiny_gpt2, [batch])
    assert result["tokens"] == sum(len(ids) - 2 for ids, _ in items)
    assert math.isclose(result["loss"], expected.item(), rel_tol=1e-5)


def test_sweep_runs_log_a_line_every_ten_steps_unless_the_grid_says_otherwise(tmp_path):
    from sparseft.app.options import build_parser
    from sparseft.app.sweep import expand, load_grid

    grid = {"out": str(tmp_path / "out"), "methods": ["random"], "budgets": [{"density": 0.01}], "seeds": [0],
            "base": {"max_steps": 2}, "variants": {"default": {}, "quiet": {"log_every": 0}}}
    (tmp_path / "g.json").write_text(json.dumps(grid))
    parsed = [build_parser().parse_args(run.argv) for run in expand(load_grid(tmp_path / "g.json"))]
    assert [ns.log_every for ns in parsed] == [10, 0]


def test_a_grid_base_can_train_in_bf16_with_gradient_checkpointing(tmp_path):
    from sparseft.app.options import build_parser, spec_from_args
    from sparseft.app.sweep import expand, load_grid

    grid = {"out": str(tmp_path / "out"), "methods": ["random", "lora"], "budgets": [{"match_lora_rank": 1}],
            "base": {"bf16": True, "gradient_checkpointing": True, "max_steps": 2}}
    (tmp_path / "g.json").write_text(json.dumps(grid))
    for run in expand(load_grid(tmp_path / "g.json")):
        assert "--bf16" in run.argv and "--gradient-checkpointing" in run.argv
        training = spec_from_args(build_parser().parse_args(run.argv)).training
        assert training.bf16 is True and training.gradient_checkpointing is True
