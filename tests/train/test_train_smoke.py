"""End to end on real pieces: prepare PTB, `dist-lm train configs/cpu_smoke.toml`, W&B offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.cli import REPO

DIST_LM = str(Path(sys.executable).parent / "dist-lm")
pytestmark = pytest.mark.slow


def test_cpu_smoke_end_to_end(tmp_path, shared_data):
    # OMP_WAIT_POLICY=PASSIVE: on a shared 2-core machine spinning OpenMP threads cost 10x+
    env = dict(os.environ, DIST_LM_DATA_DIR=str(shared_data), WANDB_MODE="offline",
               OMP_WAIT_POLICY="PASSIVE",
               DIST_LM_BASELINES=str(tmp_path / "baselines.json"))
    env.pop("WANDB_SILENT", None)  # W&B's own output is dist-lm's to quiet, not the test's
    env.pop("WANDB_DIR", None)
    shards = tmp_path / "shards" / "ptb"
    subprocess.run([DIST_LM, "prepare", "ptb", f"--out={shards}", "--download=False"], env=env,
                   check=True, capture_output=True, timeout=300)
    run_dir = tmp_path / "run"
    p = subprocess.run([DIST_LM, "train", str(REPO / "configs" / "cpu_smoke.toml"),
                        f"--train.run_dir={run_dir}", f"--data.shards={shards}"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 20 and (run_dir / "vocab.json").is_file()
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    for key in ("ppl", "lr", "seq_len", "grad_norm", "tokens_per_s", "tokens_per_s_per_device",
                "data_wait_share"):
        assert key in train_rows[-1]
    final = rows[-1]
    assert final["final"] and final["valid_ppl"] > 1 and final["test_ppl"] > 1
    assert (run_dir / "checkpoints" / "step-00000020" / "DONE").is_file()
    assert (run_dir / "checkpoints" / "step-00000010" / "DONE").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline wrote no run directory"
    wandb_lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "wandb" in ln.lower()]
    assert len(wandb_lines) == 1 and "wandb sync" in wandb_lines[0], wandb_lines  # one line
    # a single-device run records no baseline unless asked (train.record_baseline)
    assert not (tmp_path / "baselines.json").exists()
    assert not any("scaling_efficiency" in r for r in rows)
