"""The repository's promises: CI runs the README's test command."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_has_exactly_two_setup_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert "sparseft train" in commands[0] and "pytest" in commands[1]
    for cmd in commands:
        assert "torch==2.13.0" in cmd  # never a bare torch requirement (multi-GB CUDA build)


def test_ci_runs_the_readme_test_command():
    assert readme_commands()[1] in (ROOT / ".ci" / "run").read_text()
