"""Shared test fixtures. Tests run on CPU only; multi-rank tests use gloo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The benchmark corpora (dist_lm.bench.benchmark_corpora: $DIST_LM_SHARED_DATA, else
    ../shared/data beside the repo, else $DIST_LM_DATA_DIR). A missing folder is an error, not
    a skip."""
    from dist_lm.bench import benchmark_corpora

    return benchmark_corpora()
