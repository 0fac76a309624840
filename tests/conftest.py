"""Shared test fixtures. Tests run on CPU only; multi-rank tests use gloo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


def shared_data_dir() -> Path:
    """The benchmark corpora: $DIST_LM_SHARED_DATA, else ../shared/data beside the repo.
    A missing folder is an error, not a skip."""
    from dist_lm.bench import benchmark_corpora

    return benchmark_corpora()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_dir()
