"""The command table: every command is reachable, documented, and returns None."""

from __future__ import annotations

import inspect

import pytest

from dist_lm.__main__ import COMMANDS
from helpers.cli import run_cli  # `.text`: fire writes help to stderr


def test_top_level_help_lists_every_command():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for name, fn in COMMANDS.items():
        assert name in proc.text
        first_line = inspect.getdoc(fn).splitlines()[0]
        assert first_line in proc.text, name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_help_and_documents_its_arguments(name):
    fn = COMMANDS[name]
    doc = inspect.getdoc(fn)
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind not in (p.VAR_KEYWORD,)]
    for p in params:
        assert f"{p.name}:" in doc, f"{name}: argument {p.name} is not documented"
    proc = run_cli(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert doc.splitlines()[0] in proc.text


def test_train_help_lists_config_keys():
    proc = run_cli("train", "--help")
    assert proc.returncode == 0
    for key in ("--optim.lr", "--train.run_dir", "--dist.engine", "--checkpoint.every_steps"):
        assert key in proc.text


def test_unknown_bench_group_is_a_clear_error():
    proc = run_cli("bench", "nosuchgroup")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "nosuchgroup" in proc.stderr
