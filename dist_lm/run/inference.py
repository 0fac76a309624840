"""A trained run for inference: `load_run` gives the model of a checkpoint in eval mode, with
its config and tokenizer (no training state)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config, from_dict
from ..errors import UserError
from .files import load_tensor_file, state_dict_mismatch
from .layout import AVERAGED, find_checkpoint, run_dir_of, weights_file


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
    from ..data.tokenizers import load_tokenizer
    from ..models import build_model

    ckpt = find_checkpoint(path, checkpoint)
    run_dir = run_dir_of(ckpt)
    cfg = read_run_config(run_dir)
    vocab = run_dir / "vocab.json"
    if not vocab.is_file():
        raise UserError(f"{run_dir} has no vocab.json; copy the corpus's vocab.json "
                        f"(from {cfg.shards_dir()}) into the run directory.")
    tokenizer = load_tokenizer(vocab)
    model = build_model(cfg.model, tokenizer.vocab_size)
    weights = weights_file(ckpt, averaged)
    state = load_tensor_file(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"checkpoint {ckpt} does not fit the model in {run_dir}/config.json "
                        f"(vocabulary or sizes differ): {state_dict_mismatch(exc)}; restore the "
                        f"run's own config.json and vocab.json.") from None
    model.to(device).eval()
    return Run(model=model, config=cfg, tokenizer=tokenizer, checkpoint=ckpt,
               averaged=weights.name == AVERAGED)
