"""Shared test fixtures. Tests run on CPU only; multi-rank tests use gloo.

Tests write only inside their tmp dirs: HOME, the baselines file and W&B's directory point
into a session tmp dir before anything runs (subprocesses inherit them), so nothing reaches the
user's home or ~/.cache.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="dist-lm-tests-home-"))
os.environ["HOME"] = str(_SESSION_HOME)
os.environ["DIST_LM_BASELINES"] = str(_SESSION_HOME / "baselines.json")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: `import helpers`


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The benchmark corpora (dist_lm.bench.benchmark_corpora: $DIST_LM_SHARED_DATA, else
    ../shared/data beside the repo, else $DIST_LM_DATA_DIR). A missing folder is an error, not
    a skip."""
    from dist_lm.bench import benchmark_corpora

    return benchmark_corpora()


@pytest.fixture(scope="session")
def ptb_slice(tmp_path_factory, shared_data) -> Path:
    """Real shards of a small slice of PTB (helpers.corpus.small_corpus)."""
    from helpers.corpus import small_corpus

    return small_corpus(tmp_path_factory.mktemp("corpus"), shared_data)
