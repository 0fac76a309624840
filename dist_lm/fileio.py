"""Atomic file writes (a file is either whole or absent, never half-written) and JSON reads
with a clear error. Text is UTF-8 whatever the locale."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import UserError


def read_json(p: Path, fix: str):
    """A JSON file, or a UserError naming it and the fix."""
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{p} is not valid JSON ({exc}); {fix}.") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` under a temporary name beside `path`, then rename it into place.

    The temporary name carries the process id, so concurrent writers (several ranks or runs
    recording to one file) never write into each other's temporary file.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
    return p
