"""`dist-lm compare ... --out DIR` writes its files before it prints, and a reader that closes
stdout early (`| head -1`) gets no traceback: the files are there, the exit is quiet."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest


def _runs(root: Path) -> list[str]:
    """Two runs' metrics.jsonl with a few validations each (a table of several lines)."""
    dirs = []
    for name, scale in (("a", 1.0), ("b", 2.0)):
        recs = []
        for k in range(1, 6):
            recs.append({"step": 10 * k, "loss": 6.0 - k / scale, "tokens": 4000 * k,
                         "elapsed_s": 7.0 * k, "tokens_per_s": 500.0,
                         "tokens_per_s_per_device": 500.0})
            recs.append({"step": 10 * k, "epoch": k, "valid_loss": 5.0 - k / scale,
                         "valid_ppl": 100.0 / (k * scale), "tokens": 4000 * k,
                         "elapsed_s": 7.0 * k + 1, "valid_seconds": 1.0})
        d = root / name
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        dirs.append(str(d))
    return dirs


@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["unbuffered", "buffered"])
def test_compare_out_with_stdout_closed_writes_files_and_exits_quietly(tmp_path, unbuffered):
    runs = _runs(tmp_path)
    out = tmp_path / "cmp"
    env = {**os.environ, "WANDB_MODE": "disabled", "MPLCONFIGDIR": str(tmp_path / "mpl"),
           "PYTHONUNBUFFERED": unbuffered}
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line: every write is EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "dist_lm", "compare", *runs,
                               "--out", str(out)], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, env=env, timeout=180)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 141, proc.stderr  # 128 + SIGPIPE, as a tool killed by it
    table = (out / "compare.md").read_text()
    assert "| run | steps |" in table and f"Per validation of {runs[0]}:" in table
    for png in ("train_loss_vs_tokens.png", "valid_ppl_vs_tokens.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_compare_out_piped_into_head(tmp_path):
    """The shell's own case: `dist-lm compare ... --out DIR | head -1`."""
    runs = _runs(tmp_path)
    out = tmp_path / "cmp"
    env = {**os.environ, "WANDB_MODE": "disabled", "MPLCONFIGDIR": str(tmp_path / "mpl"),
           "PYTHONUNBUFFERED": "1"}
    cmd = shlex.join([sys.executable, "-m", "dist_lm", "compare", *runs, "--out", str(out)])
    proc = subprocess.run(["bash", "-c", f"{cmd} | head -1"], capture_output=True, text=True,
                          env=env, timeout=180)
    assert proc.stdout.startswith("| run | steps |"), proc.stdout
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert (out / "compare.md").is_file() and (out / "valid_ppl_vs_tokens.png").is_file()
