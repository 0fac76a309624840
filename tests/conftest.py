"""Shared test fixtures. Tests run on CPU only; multi-rank tests use gloo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


def shared_data_dir() -> Path:
    """The benchmark corpora: $DIST_LM_SHARED_DATA, else ../shared/data beside the repo."""
    env = os.environ.get("DIST_LM_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    if not (path / "ptb" / "ptb.train.txt").is_file():
        raise RuntimeError(f"benchmark corpora not found at {path}; set DIST_LM_SHARED_DATA "
                           f"to the folder holding ptb/, ptb-char/, wikitext-2/")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_dir()
