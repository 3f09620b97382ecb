"""A run folder and what it holds: one run's settings, checkpoints, adapter and metrics.

The rules that keep work from being lost:
- a new run never lands on a folder that holds another run, unless asked to replace it
  (``--overwrite``) or to continue it (``--resume``);
- every checkpoint carries the settings of the run that wrote it, and resuming checks
  them against the run's ``run_spec.json``;
- files are written whole (temporary file, then rename) with ordinary permissions.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from ..checkpoint import STATE_NAME, CheckpointError, latest_checkpoint
from ..model import atomic_write

SPEC_NAME = "run_spec.json"
METRICS_NAME = "metrics.json"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
RUN_ENTRIES = (METRICS_NAME, SPEC_NAME, CHECKPOINTS, ADAPTER)

# Settings that change neither the trained values nor the data: a checkpoint written
# under other values of these still belongs to the run.
_NOT_SETTINGS = {"out", "device"}
_NOT_TRAINING_SETTINGS = {"progress", "log_every", "save_every", "save_minutes", "keep_checkpoints", "eval_every"}


class RunFolderError(ValueError):
    """A run folder cannot be used as asked."""


def run_entries(out: str | os.PathLike) -> list[str]:
    """The run files that ``out`` holds already (empty for a new or unrelated folder)."""
    folder = Path(out)
    return [name for name in RUN_ENTRIES if (folder / name).exists()]


def claim(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Make ``out`` ready for a new run. A folder that holds a run is refused, unless
    ``overwrite``: then that run's files (and only those) are removed."""
    folder = Path(out)
    found = run_entries(folder)
    if found and not overwrite:
        raise RunFolderError(
            f"{folder} holds a run already ({', '.join(found)}); continue it with "
            f"`{resume_command(folder)}`, or pass --overwrite to replace it")
    for name in found:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def resume_command(out: str | os.PathLike) -> str:
    return f"sparseft train --resume {shlex.quote(str(out))}"


def settings(spec: dict[str, Any]) -> dict[str, Any]:
    """The part of a run spec (``runner.spec_to_dict``) that decides what is trained."""
    kept = {k: v for k, v in spec.items() if k not in _NOT_SETTINGS}
    if isinstance(kept.get("training"), dict):
        kept["training"] = {k: v for k, v in kept["training"].items() if k not in _NOT_TRAINING_SETTINGS}
    return json.loads(json.dumps(kept, sort_keys=True, default=str))


def checkpoint_tag(spec: dict[str, Any]) -> dict[str, Any]:
    """What each checkpoint of a run records about it (``train(checkpoint_tag=...)``)."""
    return {"run_settings": settings(spec)}


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix[:-1]} {a!r} (checkpoint) vs {b!r} (run)"]


def read_spec(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / SPEC_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no {SPEC_NAME}: not a sparseft run folder")
    return json.loads(path.read_text())


def resumable_checkpoint(run_dir: str | os.PathLike, spec: dict[str, Any]) -> tuple[Path, int]:
    """The newest complete checkpoint of the run in ``run_dir`` and its step, after checking
    that it was written under the run's settings."""
    found = latest_checkpoint(Path(run_dir) / CHECKPOINTS)
    if found is None:
        raise CheckpointError(
            f"{run_dir} has no complete checkpoint to resume from: the run was not interrupted "
            "(SIGINT/SIGTERM write one) and no --save-every/--save-minutes checkpoint was due yet")
    try:
        state = json.loads((found / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {found} cannot be read: {err}") from None
    recorded = ((state.get("loop") or {}).get("tag") or {}).get("run_settings")
    if recorded is None:
        raise CheckpointError(f"{found} records no run settings, so it cannot be matched to {run_dir}/{SPEC_NAME}; "
                              "start afresh with --overwrite")
    diff = _differences(recorded, settings(spec))
    if diff:
        raise CheckpointError(f"{found} was written by a run with other settings ({'; '.join(diff[:4])}); "
                              "it does not belong to this run. Start afresh with --overwrite")
    return found, int(state["step"])


def checkpoint_step(folder: str | os.PathLike) -> int:
    return int(json.loads((Path(folder) / STATE_NAME).read_text())["step"])


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` whole: a temporary file in the same folder, fsynced, renamed."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=float) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))
