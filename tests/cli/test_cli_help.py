"""`--help` (or `-h`) after a command's positional arguments shows that command's help and runs
nothing: fire would otherwise take the positionals as arguments, call the command, and show
help for what it returned (`dist-lm bench model --help` ran the benchmark first)."""

from __future__ import annotations

import pytest

from dist_lm.__main__ import main
from helpers.cli import run_cli


def _never(name):
    def run(*args, **kwargs):
        raise AssertionError(f"{name} ran on a request for help: {args} {kwargs}")
    return run


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_bench_group_then_help_shows_bench_help_without_benchmarking(flag, monkeypatch, capfd):
    import dist_lm.bench

    monkeypatch.setattr(dist_lm.bench, "bench_command", _never("bench_command"))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "model", flag])
    assert exit_.value.code in (0, None)
    out, err = capfd.readouterr()
    text = out + err  # fire writes help to stderr when it is not a terminal
    assert "Measure speed in one process and print a table." in text
    assert "data, kernels, model, train, eval or all" in text  # bench's own arguments
    assert "== bench" not in text


def test_eval_path_then_help_shows_eval_help_without_evaluating(tmp_path, monkeypatch, capfd):
    import dist_lm.eval.evaluate

    monkeypatch.setattr(dist_lm.eval.evaluate, "eval_command", _never("eval_command"))
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(tmp_path / "no-such-run"), "--split", "valid", "--help"])
    assert exit_.value.code in (0, None)
    out, err = capfd.readouterr()
    assert "Evaluate a run or checkpoint" in out + err
    assert "error" not in (out + err).lower()


def test_train_help_after_the_config_keeps_listing_config_keys(capsys):
    main(["train", "configs/cpu_smoke.toml", "--help"])
    out = capsys.readouterr().out
    assert "Train a model." in out and "--optim.lr" in out


@pytest.mark.parametrize("args, phrase", [
    (["eval", "no/such/run", "--help"], "Evaluate a run or checkpoint"),
    (["sweep", "report", "-h"], "Tune hyperparameters with Optuna"),
])
def test_cli_help_after_positionals_exits_0_and_runs_nothing(tmp_path, args, phrase):
    proc = run_cli(*args, cwd=tmp_path, timeout=120)
    text = proc.text
    assert proc.returncode == 0, text
    assert phrase in text
    assert "error" not in text.lower() and "Traceback" not in text
