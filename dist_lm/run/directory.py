"""The run directory's owner for writers: one writer at a time (the lock), the one decision
fresh / resume / refuse / overwrite, the checks a resume must pass, and the run's own files
(config.json, vocab.json, run.json). `open_run` is the sequence every writer (train, search)
goes through; a refused or failed start leaves the directory as it was.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable

from ..config import Config, from_dict, save_config
from ..errors import UserError
from ..fileio import fs_error, read_json, write_text_atomic
from .layout import (CHECKPOINTS, CONFIG, METRICS, RUN_FILE, VOCAB, find_checkpoint, first_whole,
                     list_checkpoints, run_dir_of)


def write_run_files(run_dir: Path, cfg: Config, corpus_dir: Path) -> None:
    """config.json and a copy of the corpus vocabulary, so a run is self-contained. The
    recorded data.corpus is the one the shards were prepared from (their manifest's), which
    may differ from the config's when only data.shards pointed at another corpus."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(recorded_config(cfg, corpus_dir), run_dir / CONFIG)
    src = corpus_dir / VOCAB
    if src.is_file():
        write_text_atomic(run_dir / VOCAB, src.read_text(encoding="utf-8"))


# ---- run directories: one run each, one writer at a time -----------------------------------

LOCK = ".lock"
# what a run (train or search) writes at its top level: a fresh start with --overwrite removes
# exactly these, never any other file of the folder
RUN_OUTPUTS = (CHECKPOINTS, METRICS, CONFIG, VOCAB, RUN_FILE, "wandb", "cell.toml", "derive.json")


def holds_run(run_dir: Path) -> bool:
    """True when run_dir has a run's checkpoints (complete or not) or metrics."""
    ck = run_dir / CHECKPOINTS
    metrics = run_dir / METRICS
    return (ck.is_dir() and any(ck.iterdir())) or (metrics.is_file() and metrics.stat().st_size > 0)


def is_run_dir(run_dir: Path) -> bool:
    """A folder dist-lm wrote a run into: its identity (run.json), checkpoints or metrics."""
    return (run_dir / RUN_FILE).is_file() or holds_run(run_dir)


def clear_run(run_dir: Path) -> None:
    """Remove a previous run's outputs (RUN_OUTPUTS only: other files of the user's stay)."""
    for name in RUN_OUTPUTS:
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def check_fresh(run_dir: Path, overwrite: bool, resuming: bool = False) -> None:
    """Refuse a fresh start that would delete what it may not: a run's checkpoints or metrics
    without --overwrite (or --resume auto finding no checkpoint: a run killed before its first
    one starts again), and any non-empty folder that is not a dist-lm run (as `git clone`
    refuses a non-empty directory), --overwrite or not. A run that wrote nothing worth keeping
    (no checkpoint, no metrics) is started afresh."""
    if not run_dir.is_dir():
        return
    names = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
    if not names:
        return
    if is_run_dir(run_dir):
        if holds_run(run_dir) and not (overwrite or resuming):
            raise UserError(f"{run_dir} already holds a run (checkpoints/ or metrics.jsonl); "
                            f"continue it with --resume auto, start it afresh with --overwrite "
                            f"(deletes {', '.join(RUN_OUTPUTS)} only), or choose another "
                            f"--train.run_dir.")
        return
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    what = " (a prepared corpus)" if "manifest.json" in names else ""
    over = " --overwrite only replaces a dist-lm run's own outputs;" if overwrite else ""
    raise UserError(f"train.run_dir {run_dir} is not empty and holds no dist-lm run{what}: it "
                    f"has {shown}.{over} choose a new or empty folder as --train.run_dir.")


def choose_start(run_dir: Path, resume: str | None, overwrite: bool) -> Path | None:
    """The one decision of a run directory (under its lock): the checkpoint to continue from,
    None for a fresh start (after which the caller clears RUN_OUTPUTS), or a refusal."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: --resume continues "
                        "the run in train.run_dir, --overwrite deletes it; pass one.")
    if resume == "auto":  # the newest checkpoint whose files verify; damaged ones skipped
        ckpts = list_checkpoints(run_dir)
        found = first_whole(ckpts[::-1])
        if ckpts and found is None:
            raise UserError(f"every checkpoint in {run_dir} is damaged (their files no longer "
                            f"match the digests DONE recorded); restore them from a copy, or "
                            f"start afresh with --overwrite.")
        if found is not None:
            return found
        check_fresh(run_dir, overwrite=False, resuming=True)  # no checkpoint yet: fresh
        return None
    if resume:
        return find_checkpoint(resume, "latest")
    check_fresh(run_dir, overwrite)
    return None


# What a resume may not change: key -> (the condition under which the key matters, why). The
# checkpoint's config (config.json of the run that wrote it) is compared with the new one before
# anything is written. Every other key may change on a resume: budgets and stops
# (train.max_steps, epochs, max_seconds, target_ppl/bpc), log.*, checkpoint.*,
# train.eval_every_steps, regularization and lr values (the lr rule itself is checked against
# trainer.pt by train.rundir.check_resume, as are world size, engine and micro batch by
# checkpoint.check_compatible).
SHAPES = "the checkpoint's weights have its shapes"
RESUME_FIXED: dict[str, tuple[tuple[str, str] | None, str]] = {
    "model.arch": (None, SHAPES),
    "model.emb_size": (None, SHAPES),
    "model.hidden_size": (None, SHAPES),
    "model.n_layers": (None, SHAPES),
    "model.tie_weights": (None, SHAPES),
    "model.head": (None, SHAPES),
    "model.cutoffs": (("model.head", "adaptive"), SHAPES),
    "model.n_experts": (("model.head", "mos"), SHAPES),
    "model.mos_latent": (("model.head", "mos"), SHAPES),
    "model.hsm_classes": (("model.head", "hierarchical"), SHAPES),
    "model.qrnn_window": (("model.arch", "qrnn"), SHAPES),
    "model.cell": (("model.arch", "cell"), SHAPES),
    "data.corpus": (None, "the vocabulary and the stream position are the corpus's"),
    "data.train_split": (None, "the stream position is that split's"),
    "optim.name": (None, "the optimizer state is that optimizer's"),
    "train.global_batch": (None, "the stream layout depends on it"),
}


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _show(value) -> str:
    """A config value as the command line writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, list) else str(value)


def recorded_config(cfg: Config, corpus_dir: Path) -> Config:
    """The config a run records: data.corpus is the one the shards were prepared from (their
    manifest's), which may differ from the config's when only data.shards pointed elsewhere."""
    manifest = corpus_dir / "manifest.json"
    if manifest.is_file():
        corpus = json.loads(manifest.read_text(encoding="utf-8")).get("corpus")
        if corpus and corpus != cfg.data.corpus:
            cfg = copy.deepcopy(cfg)
            cfg.data.corpus = corpus
    return cfg


def check_resume_config(start: Path, cfg: Config, corpus_dir: Path) -> None:
    """Refuse a resume from `start` that changes what its checkpoint cannot carry
    (RESUME_FIXED, and the vocabulary), naming each difference and the flags that continue it."""
    run_dir = run_dir_of(start)
    p = run_dir / "config.json"
    if not p.is_file():
        return  # a checkpoint without its run's config: the loaders' own checks still apply
    old = from_dict(read_json(p, f"restore {p} from a copy, or start a new run"))
    new = recorded_config(cfg, corpus_dir)
    diffs, flags = [], []
    for key, (when, why) in RESUME_FIXED.items():
        if when is not None and _get(old, when[0]) != when[1] and _get(new, when[0]) != when[1]:
            continue
        was, now = _get(old, key), _get(new, key)
        if was != now:
            diffs.append(f"{key}: checkpoint {_show(was)}, now {_show(now)} ({why})")
            flags.append(f"--data.shards={old.data.shards or old.shards_dir()}"
                         if key == "data.corpus" else f"--{key}={_show(was)}")
    ours, theirs = run_dir / "vocab.json", corpus_dir / "vocab.json"
    if not diffs and ours.is_file() and theirs.is_file() and \
            ours.read_bytes() != theirs.read_bytes():
        diffs.append(f"data.shards: {corpus_dir} has another vocabulary than the checkpoint's "
                     f"{ours}")
        flags.append(f"--data.shards={old.data.shards or old.shards_dir()}")
    if diffs:
        raise UserError(f"cannot resume from {start}: {'; '.join(diffs)}. "
                        f"Resume with the run's own values ({' '.join(flags)}), or start a new "
                        f"run: another --train.run_dir, or --overwrite without --resume.")


def new_run_id(run_dir: Path) -> str:
    """A fresh identity for a run starting in run_dir (run.json): its W&B id."""
    run_id = secrets.token_hex(6)
    write_text_atomic(run_dir / RUN_FILE, json.dumps({"id": run_id, "created": time.time()}) + "\n")
    return run_id


def run_id(run_dir: Path) -> str | None:
    """The id in run_dir/run.json, or None (a run written before run.json existed)."""
    try:
        return str(json.loads((run_dir / RUN_FILE).read_text())["id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunLock:
    """An exclusive lock on a run directory (flock on RUN_DIR/.lock, released when the process
    ends, however it ends): one writer per run directory.

    acquire(claim=False) locks without writing anything into an existing lock file; claim()
    then records this process's id. release(undo=True) after a refusal removes the folder or
    the lock file that acquire created, so a refused command leaves the tree as it was."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None
        self.made_dir = self.made_file = False

    def acquire(self, claim: bool = True) -> None:
        import fcntl

        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise UserError(f"train.run_dir {folder} is a file, not a folder; choose another "
                            f"--train.run_dir.")
        try:
            self.made_dir = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            self.made_file = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            self.undo()
            fix = ("choose a folder you can write as --train.run_dir, or fix its permissions"
                   if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else
                   "free some space, then run the command again"
                   if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else
                   "choose another --train.run_dir")
            raise UserError(f"cannot write {exc.filename or self.path}: {exc.strerror}; "
                            f"{fix}.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"run directory {folder} is in use by another dist-lm "
                            f"train (pid {holder}); wait for it to finish, or choose another "
                            f"--train.run_dir.") from None
        self.fd = fd
        if claim:
            self.claim()

    def claim(self) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def undo(self) -> None:
        """Remove what acquire created (after a refusal: nothing of the command stays)."""
        if self.made_dir:
            shutil.rmtree(self.path.parent, ignore_errors=True)
        elif self.made_file:
            self.path.unlink(missing_ok=True)
        self.made_dir = self.made_file = False

    def release(self, undo: bool = False) -> None:
        if undo:
            self.undo()  # while still holding the lock: no other writer can be in between
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def open_run(run_dir: Path, cfg: Config, corpus_dir: Path, resume: str | None, overwrite: bool,
             *, check: Callable[[Path], None] | None = None,
             write: Callable[[Path], None] | None = None) -> tuple[RunLock, Path | None]:
    """Open run_dir for one writer (train's rank 0, search): lock it, decide fresh / resume /
    refuse (choose_start), check the checkpoint against this config (check_resume_config, then
    the writer's own `check(start)`), and only then write: claim the lock, and for a fresh
    start clear the previous run's outputs and give the run its identity (run.json); then
    config.json, vocab.json and the writer's own files (`write(run_dir)`). Returns the held
    lock and the checkpoint to continue from (None: fresh).

    A refusal is a UserError and a failed write (a full disk, a read-only file) one as well;
    either way the lock is released and what this call created is removed: a refused or failed
    start leaves the directory as it was (a fresh start's half-written files are cleared)."""
    lock = RunLock(run_dir)
    fresh = False
    try:
        lock.acquire(claim=False)  # nothing written into an existing run yet
        start = choose_start(run_dir, resume, overwrite)
        if start is not None:
            check_resume_config(start, cfg, corpus_dir)
            if check is not None:
                check(start)
        lock.claim()
        fresh = start is None
        if fresh:
            clear_run(run_dir)  # a fresh start: nothing of an earlier run survives
            new_run_id(run_dir)  # first: a folder with a run's files is marked as a run
        write_run_files(run_dir, cfg, corpus_dir)
        if write is not None:
            write(run_dir)
        if run_id(run_dir) is None:
            new_run_id(run_dir)
    except OSError as exc:
        if fresh:
            clear_run(run_dir)
        lock.release(undo=True)
        raise UserError(f"cannot start the run in {run_dir}: {fs_error(exc) or exc}") from None
    except BaseException:
        lock.release(undo=True)
        raise
    return lock, start
