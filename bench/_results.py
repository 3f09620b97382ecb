"""The one way the bench scripts write their result file (run as ``python bench/NAME.py``,
so this folder is on ``sys.path``)."""
from __future__ import annotations

import json
import os


def write_result(path: str, result: dict) -> None:
    """``result`` as indented JSON at ``path``, creating its folder."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
