"""Atomic file writes: a file is either whole or absent (never half-written)."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` under a temporary name beside `path`, then rename it into place.

    The temporary name carries the process id, so concurrent writers (several ranks or runs
    recording to one file) never write into each other's temporary file.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, p)
    return p
