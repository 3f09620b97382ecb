"""`sparseft --help` explains itself: one default per option, required options marked,
examples, and each command shows only its own options."""
import re

import pytest

from sparseft import __version__
from sparseft.app.cli import build_parser, main
from sparseft.app.lmtasks import task_descriptions

COMMANDS = ("train", "eval", "sweep", "plot", "export")


def help_of(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


def options(text):
    """Each option's help, continuation lines joined."""
    entries, current = [], None
    for line in text.splitlines():
        if re.match(r"^  -", line) or re.match(r"^  \w", line) and current is None:
            current = [line.strip()]
            entries.append(current)
        elif line.startswith("    ") and current is not None:
            current.append(line.strip())
        else:
            current = None
    return [" ".join(e) for e in entries]


@pytest.mark.parametrize("command", COMMANDS)
def test_no_option_shows_two_defaults(command, capsys):
    text = help_of(command, capsys)
    assert "default: None" not in text and "default: False" not in text
    found = options(text)
    assert found
    for entry in found:
        assert len(re.findall(r"\bdefault\b", entry, re.I)) <= 1, entry


def test_required_options_say_so(capsys):
    assert "--adapter ADAPTER" in help_of("eval", capsys)
    assert re.search(r"--adapter ADAPTER\s+an adapter folder .*\(required\)", re.sub(r"\s+", " ", help_of("eval", capsys)))
    assert "(required, unless --resume)" in re.sub(r"\s+", " ", help_of("train", capsys))


def test_train_help_has_examples_and_every_task(capsys):
    text = re.sub(r"\s+", " ", help_of("train", capsys))
    assert "examples: sparseft train --task rt-sentiment" in text
    for name in task_descriptions():
        assert name in text


def test_eval_shows_only_its_own_options(capsys):
    text = help_of("eval", capsys)
    for training_only in ("--method", "--lr", "--density", "--batch-size", "--max-train-examples", "--save-every",
                          "--epochs", "--overwrite"):
        assert training_only not in text
    assert "--strict" in text and "--force" in text


def test_sweep_help_documents_the_grid_format(capsys):
    text = help_of("sweep", capsys)
    for key in ("out:", "base:", "methods:", "budgets:", "lrs:", "seeds:", "match_lora_rank"):
        assert key in text


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"sparseft {__version__}"


def test_device_defaults_to_auto():
    assert build_parser().parse_args(["train", "--out", "x"]).device == "auto"


def test_an_unknown_task_lists_the_same_tasks_as_help(tmp_path, capsys):
    assert main(["train", "--task", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'nope'" in err and ", ".join(task_descriptions()) in err
