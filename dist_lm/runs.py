"""Run directories and the inference side of checkpoints.

A run directory holds config.json, vocab.json, metrics.jsonl and checkpoints/step-XXXXXXXX/.
A step directory counts only once its DONE marker exists (written last, after every rank
finished writing). This module finds checkpoints and loads a model for evaluation,
generation and scoring; the training state lives in dist_lm/train/checkpoint.py.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config, from_dict, save_config
from .errors import UserError
from .fileio import read_json, write_text_atomic

MARKER = "DONE"
STEP_RE = re.compile(r"^step-(\d{8})$")
RUN_FILE = "run.json"  # the run's identity: its W&B id, created once, reused by every resume
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
    root = Path(run_dir) / "checkpoints"
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
        if p.is_file() and rel != MARKER and not rel.startswith("eval-") and not rel.endswith(".tmp"):
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
        print(f"dist-lm: warning: skipping checkpoint {p}: {why} (damaged after it was written)",
              file=sys.stderr, flush=True)
    return None


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
    p = Path(run_dir) / "checkpoints" / step_dir_name(best)
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
    want = p / "checkpoints" / step_dir_name(int(m.group(1)))
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


def load_tensor_file(path: Path) -> Any:
    """torch.load with weights_only=True: loading a checkpoint never runs pickled code.

    A file holding any other pickled object is refused with dist-lm's own message (never
    torch's, which suggests turning the check off); an unreadable file is reported as damaged."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it may not read
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint file {path} is missing; the checkpoint is damaged, "
                        f"use another step.") from None
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("Weights only load failed"):
            found = re.search(r"GLOBAL (\S+)", str(exc))
            what = f" (it names {found.group(1)})" if found else ""
            raise UserError(
                f"refused to load checkpoint file {path}: it holds pickled objects that are not "
                f"plain tensors and containers{what}, and loading them could run code. dist-lm "
                f"never loads such files; use another checkpoint, or re-create this one by "
                f"training.") from None
        failure = exc
    except Exception as exc:  # corrupt zip, truncated or foreign file, ...
        failure = exc
    text = str(failure).strip()
    first = text.splitlines()[0].split(". ")[0][:160] if text else ""  # torch's are paragraphs
    reason = f"{type(failure).__name__}: {first}" if first else type(failure).__name__
    raise UserError(f"cannot read checkpoint file {path}: it is damaged or not a torch "
                    f"checkpoint ({reason}); use another step.")


def write_run_files(run_dir: Path, cfg: Config, corpus_dir: Path) -> None:
    """config.json and a copy of the corpus vocabulary, so a run is self-contained. The
    recorded data.corpus is the one the shards were prepared from (their manifest's), which
    may differ from the config's when only data.shards pointed at another corpus."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(recorded_config(cfg, corpus_dir), run_dir / "config.json")
    src = corpus_dir / "vocab.json"
    if src.is_file():
        write_text_atomic(run_dir / "vocab.json", src.read_text(encoding="utf-8"))


# ---- run directories: one run each, one writer at a time -----------------------------------

LOCK = ".lock"
# what a run (train or search) writes at its top level: a fresh start with --overwrite removes
# exactly these, never any other file of the folder
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "config.json", "vocab.json", RUN_FILE, "wandb",
               "cell.toml", "derive.json")


def holds_run(run_dir: Path) -> bool:
    """True when run_dir has a run's checkpoints (complete or not) or metrics."""
    ck = run_dir / "checkpoints"
    metrics = run_dir / "metrics.jsonl"
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
# trainer.pt by Trainer._check_resume, as are world size, engine and micro batch by
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


def state_dict_mismatch(exc: RuntimeError) -> str:
    """The first specific line of torch's load_state_dict error (its first line is only
    'Error(s) in loading state_dict for ...'): a size mismatch or a missing key."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__)[:240]


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


def read_run_config(run_dir: Path) -> Config:
    p = run_dir / "config.json"
    if not p.is_file():
        raise UserError(f"{run_dir} has no config.json; it is not a dist-lm run directory.")
    return from_dict(json.loads(p.read_text()))


@dataclass
class Run:
    model: torch.nn.Module
    config: Config
    tokenizer: Any
    checkpoint: Path
    averaged: bool


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu",
             averaged: bool = True, checkpoint: str = "best") -> Run:
    """Load a trained model for evaluation/generation/scoring (eval mode, no training state).

    A run directory gives its best validation checkpoint (`checkpoint="best"`, the averaged
    weights where NT-ASGD averaged), or "latest", or "step-N"; a step directory gives itself.
    """
    from .data.tokenizers import load_tokenizer
    from .models import build_model

    ckpt = find_checkpoint(path, checkpoint)
    run_dir = run_dir_of(ckpt)
    cfg = read_run_config(run_dir)
    vocab = run_dir / "vocab.json"
    if not vocab.is_file():
        raise UserError(f"{run_dir} has no vocab.json; copy the corpus's vocab.json "
                        f"(from {cfg.shards_dir()}) into the run directory.")
    tokenizer = load_tokenizer(vocab)
    model = build_model(cfg.model, tokenizer.vocab_size)
    use_avg = averaged and (ckpt / "averaged.pt").is_file()
    state = load_tensor_file(ckpt / ("averaged.pt" if use_avg else "model.pt"))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"checkpoint {ckpt} does not fit the model in {run_dir}/config.json "
                        f"(vocabulary or sizes differ): {state_dict_mismatch(exc)}; restore the "
                        f"run's own config.json and vocab.json.") from None
    model.to(device).eval()
    return Run(model=model, config=cfg, tokenizer=tokenizer, checkpoint=ckpt, averaged=use_avg)
