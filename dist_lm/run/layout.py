"""The run directory's layout: step names, the DONE marker with its digests, and finding the
latest, the best and the newest whole checkpoint.

    RUN/
        config.json  vocab.json  run.json  metrics.jsonl
        checkpoints/step-XXXXXXXX/   model.pt [averaged.pt] trainer.pt optim.pt rank-*.pt DONE

A step directory counts only once its DONE marker exists (written last, after every rank
finished writing; dist_lm.run.checkpointer writes it). Every reader finds checkpoints here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

from ..errors import UserError

MARKER = "DONE"
STEP_RE = re.compile(r"^step-(\d{8})$")
CHECKPOINTS = "checkpoints"  # RUN/checkpoints/step-XXXXXXXX/
CONFIG, VOCAB, METRICS = "config.json", "vocab.json", "metrics.jsonl"  # RUN/ itself
RUN_FILE = "run.json"  # the run's identity: its W&B id, created once, reused by every resume
MODEL, AVERAGED = "model.pt", "averaged.pt"  # a step's weights; averaged.pt only when averaging
WHICH = "latest, best or step-N"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(step_dir: Path) -> int:
    return int(STEP_RE.match(step_dir.name).group(1))


def is_complete(step_dir: Path) -> bool:
    return (step_dir / MARKER).is_file()


def read_marker(step_dir: Path) -> dict:
    """The DONE marker's record ({"format", "step", "best_step", "files"}); {} for a marker of
    the first format (a bare step number) or one that cannot be read."""
    try:
        rec = json.loads((step_dir / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete step directories of a run, oldest first (incomplete ones are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and is_complete(p)]
    return sorted(found, key=step_of)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_files(step_dir: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file a checkpoint holds (its marker, eval
    results written beside it later and temporary files excluded): what DONE records."""
    out = {}
    for p in sorted(step_dir.rglob("*")):
        rel = p.relative_to(step_dir).as_posix()
        if p.is_file() and rel != MARKER and not rel.startswith("eval-") \
                and not rel.endswith(".tmp"):
            out[rel] = [p.stat().st_size, _sha256(p)]
    return out


_VERIFIED: set[tuple[str, int]] = set()  # (step dir, marker mtime) already checked in this process


def damage(step_dir: Path) -> str | None:
    """What is wrong with a complete checkpoint's files against the digests its DONE recorded
    (None: all whole; a marker without digests, from before they were recorded, is taken as is)."""
    try:
        key = (str(step_dir.resolve()), (step_dir / MARKER).stat().st_mtime_ns)
    except OSError:
        return f"{MARKER} is missing"
    if key in _VERIFIED:
        return None
    files = read_marker(step_dir).get("files")
    if not isinstance(files, dict):
        return None
    for rel, (size, digest) in files.items():
        p = step_dir / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, {size} were written"
        if _sha256(p) != digest:
            return f"{rel} does not match its sha256"
    _VERIFIED.add(key)
    return None


def first_whole(candidates: list[Path]) -> Path | None:
    """The first checkpoint in `candidates` whose files verify; each damaged one before it is
    skipped with a warning naming the file."""
    for p in candidates:
        why = damage(p)
        if why is None:
            return p
        if p not in _WARNED:  # once per process: a command may look for its checkpoint twice
            _WARNED.add(p)
            print(f"dist-lm: warning: skipping checkpoint {p}: {why} (damaged after it was "
                  f"written)", file=sys.stderr, flush=True)
    return None


_WARNED: set[Path] = set()


def run_dir_of(step_dir: Path) -> Path:
    """checkpoints/step-X lives two levels under its run directory."""
    return step_dir.parent.parent


def best_checkpoint(run_dir: Path) -> Path | None:
    """The step directory of the best validation, as the newest complete checkpoint records it
    (None when that checkpoint records none, or the best one is gone)."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None
    best = read_marker(ckpts[-1]).get("best_step", -1)
    if not isinstance(best, int) or best < 0:
        return None
    p = checkpoint_dir(run_dir, best)
    return p if is_complete(p) else None


def find_checkpoint(path: str | os.PathLike, which: str = "best") -> Path:
    """A step dir -> itself if complete and whole; a run dir -> its best checkpoint
    (`which="best"`: the best validation, else the latest when none is recorded), its latest
    ("latest"), or a given step ("step-N" / "N"). A damaged best or latest checkpoint (a file
    that no longer matches the digest DONE recorded) is skipped with a warning for the newest
    whole one; a damaged checkpoint asked for by name is an error."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist; pass a run directory (with checkpoints/) "
                        f"or a checkpoints/step-XXXXXXXX directory.")
    if STEP_RE.match(p.name):
        if not is_complete(p):
            raise UserError(f"checkpoint {p} is incomplete (no {MARKER} marker: the run "
                            f"stopped while writing it); use an earlier step or the run directory.")
        return _whole(p)
    which = str(which).strip()
    ckpts = list_checkpoints(p)
    if not ckpts and not any((p / name).exists() for name in (RUN_FILE, CONFIG, METRICS,
                                                               CHECKPOINTS)):
        raise UserError(f"{p} is not a dist-lm run directory (no {RUN_FILE}, {CONFIG} or "
                        f"{CHECKPOINTS}/); pass the folder a `dist-lm train` wrote, its "
                        f"--train.run_dir.")
    if not ckpts:
        raise UserError(f"{p} has no finished checkpoint (no checkpoints/step-*/{MARKER}); "
                        f"train longer or set checkpoint.every_steps so one gets written.")
    if which in ("latest", "best"):
        best = best_checkpoint(p) if which == "best" else None
        found = first_whole(([best] if best else []) + ckpts[::-1])
        if found is None:
            raise UserError(f"every checkpoint of {p} is damaged (files no longer match the "
                            f"digests their {MARKER} recorded); retrain, or restore them from a "
                            f"copy.")
        return found
    m = re.fullmatch(r"(?:step-)?(\d+)", which)
    if m is None:
        raise UserError(f"--checkpoint {which!r}: choose {WHICH} (e.g. step-1200).")
    want = checkpoint_dir(p, int(m.group(1)))
    if want not in ckpts:
        have = ", ".join(c.name for c in ckpts)
        raise UserError(f"{p} has no complete checkpoint {want.name}; it has {have}.")
    return _whole(want)


def _whole(step_dir: Path) -> Path:
    why = damage(step_dir)
    if why is not None:
        raise UserError(f"checkpoint {step_dir} is damaged: {why}; use another step (or the run "
                        f"directory, which picks the newest whole checkpoint).")
    return step_dir


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """RUN/checkpoints/step-XXXXXXXX (whether or not it exists)."""
    return Path(run_dir) / CHECKPOINTS / step_dir_name(step)


def weights_file(step_dir: Path, averaged: bool = True) -> Path:
    """The weights a checkpoint stands for: averaged.pt if present (NT-ASGD averaged; unless
    `averaged` is False), else model.pt. The one place that choice is made."""
    avg = step_dir / AVERAGED
    return avg if averaged and avg.is_file() else step_dir / MODEL
