"""Run directories and the inference side of checkpoints.

A run directory holds config.json, vocab.json, metrics.jsonl and checkpoints/step-XXXXXXXX/.
A step directory counts only once its DONE marker exists (written last, after every rank
finished writing). This module finds checkpoints and loads a model for evaluation,
generation and scoring; the training state lives in dist_lm/train/checkpoint.py.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config, from_dict, save_config
from .errors import UserError
from .fileio import write_text_atomic

MARKER = "DONE"
STEP_RE = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(step_dir: Path) -> bool:
    return (step_dir / MARKER).is_file()


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete step directories of a run, oldest first (incomplete ones are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def run_dir_of(step_dir: Path) -> Path:
    """checkpoints/step-X lives two levels under its run directory."""
    return step_dir.parent.parent


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A run dir -> its latest complete checkpoint; a step dir -> itself if complete."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist; pass a run directory (with checkpoints/) "
                        f"or a checkpoints/step-XXXXXXXX directory.")
    if STEP_RE.match(p.name):
        if not is_complete(p):
            raise UserError(f"checkpoint {p} is incomplete (no {MARKER} marker: the run "
                            f"stopped while writing it); use an earlier step or the run directory.")
        return p
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise UserError(f"{p} has no finished checkpoint (no checkpoints/step-*/{MARKER}); "
                        f"train longer or set checkpoint.every_steps so one gets written.")
    return ckpts[-1]


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
    """config.json and a copy of the corpus vocabulary, so a run is self-contained."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")
    src = corpus_dir / "vocab.json"
    if src.is_file():
        write_text_atomic(run_dir / "vocab.json", src.read_text(encoding="utf-8"))


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
             averaged: bool = True) -> Run:
    """Load a trained model for evaluation/generation/scoring (eval mode, no training state)."""
    from .data.tokenizers import load_tokenizer
    from .models import build_model

    ckpt = find_checkpoint(path)
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
                        f"(vocabulary or sizes differ): {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    return Run(model=model, config=cfg, tokenizer=tokenizer, checkpoint=ckpt, averaged=use_avg)
