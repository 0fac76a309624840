"""Atomic file writes (a file is either whole or absent, never half-written) and JSON reads
with a clear error. Text is UTF-8 whatever the locale."""

from __future__ import annotations

import errno
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
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    except BaseException:  # a full disk, a size limit, Ctrl-C: no temporary file stays behind
        tmp.unlink(missing_ok=True)
        raise
    return p


# errno -> what to do; the file-system errors a user can cause and fix (dist_lm.__main__ turns
# them into one line; others stay tracebacks: they are bugs)
_FIXES = {
    errno.EACCES: "that place is read-only for you: fix its permissions or choose another one",
    errno.EPERM: "that place is read-only for you: fix its permissions or choose another one",
    errno.EROFS: "the file system is read-only: choose a location on a writable one",
    errno.ENOSPC: "the disk is full: free some space, then run the command again",
    errno.EDQUOT: "your disk quota is used up: free some space, then run the command again",
    errno.EFBIG: "the file size limit (ulimit -f) was reached: raise it or free space, then run "
                 "the command again",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EEXIST: "a file is in the way of a folder: choose another path",
    errno.EISDIR: "it is a folder, not a file: choose a file name",
}


def fs_error(exc: OSError) -> str | None:
    """One line for a file-system error the user can fix (None for any other OSError):
    what could not be done, where, and the fix."""
    fix = _FIXES.get(exc.errno)
    if fix is None:
        return None
    where = f" at {exc.filename}" if exc.filename else ""
    return f"file-system error{where}: {exc.strerror}; {fix}."
