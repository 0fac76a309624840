"""Running dist-lm as a user does: `python -m dist_lm ...` (or torchrun) in a subprocess with
the test environment, and checking a refusal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dist_lm.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DIST_LM = [sys.executable, "-m", "dist_lm"]
TRAIN_ENTRY = Path(__file__).with_name("train_entry.py")


def cli_env(extra: dict | None = None, **more) -> dict:
    """os.environ for a child: one thread (2 shared cores), W&B off, this checkout importable,
    no .pyc written, no pager, no fault injection inherited; then `extra` and `more` (a value of
    None removes the variable)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO),
             PYTHONDONTWRITEBYTECODE="1", PAGER="cat")
    e = {k: v for k, v in e.items() if not k.startswith("DIST_LM_FAULT_")}
    for k, v in {**(extra or {}), **more}.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = str(v)
    return e


def torchrun(nproc: int) -> list[str]:
    """The head of a torchrun command line: `nproc` local ranks on a free loopback port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def run_cli(*args, cwd: Path | None = None, env: dict | None = None, timeout: float = 300,
            prefix: tuple | list = ()) -> subprocess.CompletedProcess:
    """`python -m dist_lm ARGS` under cli_env(env); `.text` joins stdout and stderr (fire
    writes help to stderr when it is not a terminal)."""
    proc = subprocess.run([*prefix, *DIST_LM, *map(str, args)], cwd=cwd, env=cli_env(env),
                          capture_output=True, text=True, timeout=timeout)
    proc.text = proc.stdout + proc.stderr
    return proc


def run_ok(cmd: list, cwd: Path = REPO, timeout: float = 300, **env):
    """Run a command line under cli_env(**env) and require exit 0."""
    p = subprocess.run(cmd, cwd=cwd, env=cli_env(env), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def assert_clean_failure(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, one `dist-lm: error:` line (the last) naming the needles, no traceback."""
    err = res.stderr.strip()
    assert res.returncode != 0, (res.stdout, err)
    assert "Traceback" not in err and "Traceback" not in res.stdout, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    # progress lines may precede the error line
    assert errors == lines[-1:] and lines[-1].startswith("dist-lm: error: "), err
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]
