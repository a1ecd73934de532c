"""Read a JSON object from a user's file, with one-line errors that name the file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from planc.errors import CheckpointError, PlancError


def read_json_object(path: Path, error: type[PlancError] = CheckpointError,
                     missing: Optional[str] = None) -> dict[str, Any]:
    """The JSON object in `path`; `missing` is the message when the file does not exist."""
    if not path.is_file():
        raise error(missing or f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
