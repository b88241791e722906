"""Read a model folder's JSON settings files (config.json and its kin) with one clear error for a bad one."""

import json
from pathlib import Path
from typing import Any

from tokenmill.errors import ModelLoadError


def read_json_object(path: Path) -> dict[str, Any]:
    """The one JSON object a settings file holds, or a ModelLoadError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # missing, unreadable, not UTF-8, not JSON
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(value).__name__}, not an object of settings")
    return value
