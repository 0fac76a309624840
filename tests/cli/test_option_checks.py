"""Beside the bad-input table (tests/cli/test_bad_inputs.py, where the refused options are rows):
where W&B credentials are looked for, launch/torchrun.sh refusing a bad config once instead of
once per rank and restart, and the progress bar of `dist-lm eval` on a terminal (none in a
log)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios
from pathlib import Path

import pytest

from helpers.cli import BIN, DIST_LM, REPO, assert_clean_failure, cli_env
from helpers.config import OPTION_TOML
from helpers.corpus import make_corpus, sentences
from helpers.runs import make_run


def test_wandb_credentials_found_where_wandb_reads_them(tmp_path, monkeypatch):
    from dist_lm.config import wandb_credentials

    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "conf"))
    assert wandb_credentials() is None
    (tmp_path / "netrc").write_text("machine example.org login u password p\n")
    assert wandb_credentials() is None  # another host's entry
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password 0123abcd\n")
    assert wandb_credentials() == str(tmp_path / "netrc")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a private server
    assert wandb_credentials() is None
    monkeypatch.setenv("WANDB_API_KEY", "0123abcd")
    assert wandb_credentials() == "$WANDB_API_KEY"


def test_torchrun_script_refuses_a_bad_config_once(tmp_path):
    """Before: torchrun started the ranks, each refused the config, and the elastic restarts
    repeated it (8 copies of the message). Now one line, exit 2, no rank started."""
    (tmp_path / "tiny.toml").write_text(OPTION_TOML)
    env = cli_env(NPROC="2", TORCHRUN=str(BIN / "torchrun"), MAX_RESTARTS="3")
    res = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"),
                          str(tmp_path / "tiny.toml"), "--optim.clip=-1",
                          f"--train.run_dir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert_clean_failure(res, "optim.clip must be >= 0")
    assert res.returncode == 2
    assert res.stderr.count("dist-lm: error:") == 1
    assert "torchrun" not in res.stdout  # the launch line is printed just before torchrun runs
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    corpus = make_corpus(root, sentences(200, 1), sentences(60, 2), sentences(40, 3))
    return make_run(root, corpus, train_steps=0)


def _eval(run_dir: Path, tty: bool) -> str:
    """stderr of `dist-lm eval RUN --split valid`, on a pseudo-terminal or a pipe."""
    cmd = [*DIST_LM, "eval", str(run_dir), "--split", "valid"]
    env = cli_env()
    if not tty:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stderr
    master, slave = pty.openpty()
    # a terminal of 100 columns: a fresh pty has 0, where tqdm draws an empty bar
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(120) == 0
    return b"".join(chunks).decode(errors="replace")


def test_eval_shows_progress_on_a_terminal_only(small_run):
    on_tty = _eval(small_run, tty=True)
    assert "eval valid" in on_tty and "tok" in on_tty, on_tty[-500:]
    assert "eval valid" not in _eval(small_run, tty=False)
