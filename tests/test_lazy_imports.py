"""Importing sparseft (the library or its CLI) loads neither bitsandbytes nor peft: only a
quantized base or a peft baseline does, and then bitsandbytes' import-time kernel-package
warning is kept quiet."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import sparseft

SRC = str(Path(sparseft.__file__).resolve().parent.parent)


def _python(code: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **env_vars)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_importing_the_cli_imports_neither_bitsandbytes_nor_peft():
    out = _python("import sys, sparseft, sparseft.app.cli\n"
                  "print(sorted(m for m in ('bitsandbytes', 'peft') if m in sys.modules))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert "bitsandbytes" not in out.stderr and "kernels-community" not in out.stderr


def test_the_callback_and_trainer_load_on_first_use_and_quietly():
    out = _python("import sparseft\n"
                  "from sparseft.callback import SparseCallback\n"
                  "assert sparseft.SparseCallback is SparseCallback\n"
                  "from transformers import TrainerCallback\n"
                  "assert issubclass(sparseft.SparseCallback, TrainerCallback)\n"
                  "sparseft.SparseTrainer\n"
                  "from sparseft.app.baselines import _peft\n"
                  "_peft()\n", HF_HUB_OFFLINE="1")  # as every CLI run sets it
    assert out.returncode == 0, out.stderr
    assert "kernels-community" not in out.stderr
