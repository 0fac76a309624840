"""`dist-lm sweep report` on a study with pruned trials: the in-memory studies it builds for
the importances at the pruner's rungs log nothing (Optuna's "A new study created in memory
with name: ..." came once per rung), and Optuna's verbosity is the same afterwards."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from dist_lm.sweep.space import load_spec
from dist_lm.sweep.study import SPEC_COPY, STUDY_INFO, open_study
from helpers.cli import REPO
from helpers.config import LR_DROPOUT

NEW_STUDY = "A new study created in memory"

SPACE = f"""[study]
name = "quiet"
base = "{REPO / 'configs' / 'cpu_smoke.toml'}"
budget = {{ steps = 20 }}
eval_every_steps = 5
sampler = {{ kind = "random", seed = 0 }}
""" + LR_DROPOUT


def study_dir(root: Path) -> Path:
    """What `dist-lm sweep` leaves: study.toml, study.json and a journal holding 4 complete
    trials and 16 pruned ones, all of them validated at steps 5 and 10 (two rungs of >= 10)."""
    sdir = root / "study"
    sdir.mkdir()
    (sdir / SPEC_COPY).write_text(SPACE)
    spec = load_spec(sdir / SPEC_COPY)
    url = str(sdir / "study.journal")
    (sdir / STUDY_INFO).write_text(json.dumps({"name": spec.name, "space": str(sdir / SPEC_COPY),
                                               "base": str(spec.base), "storage": url}))
    study = open_study(spec, url)
    dists = {"optim.lr": FloatDistribution(5, 40, log=True),
             "model.dropout": FloatDistribution(0.0, 0.5)}
    rng = random.Random(0)
    for i in range(20):
        lr, dropout = 5 * 8 ** rng.random(), 0.5 * rng.random()
        done = i < 4
        at = {step: 300 - 4 * lr + 10 * dropout + step + rng.random()
              for step in ((5, 10, 15, 20) if done else (5, 10))}
        study.add_trial(create_trial(
            params={"optim.lr": lr, "model.dropout": dropout}, distributions=dists,
            intermediate_values=at, value=at[20] if done else None,
            state=TrialState.COMPLETE if done else TrialState.PRUNED,
            user_attrs={"point": {"optim.lr": lr, "model.dropout": dropout},
                        "run_dir": str(sdir / "trials" / str(i))}))
    return sdir


@pytest.fixture()
def optuna_info(monkeypatch, tmp_path):
    """Optuna at its default verbosity (INFO, as a user's `dist-lm sweep report` runs it; other
    test modules lower it), with every record of the 'optuna' logger collected."""
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record)

    handler = Collect(level=logging.DEBUG)
    logging.getLogger("optuna").addHandler(handler)
    try:
        yield seen
    finally:
        logging.getLogger("optuna").removeHandler(handler)
        optuna.logging.set_verbosity(before)


def test_report_with_rungs_logs_no_in_memory_study(tmp_path, optuna_info, capfd):
    from dist_lm.__main__ import main

    sdir = study_dir(tmp_path)
    optuna_info.clear()
    capfd.readouterr()  # the journal study's own "created" line is not the report's
    main(["sweep", "report", str(sdir)])
    out, err = capfd.readouterr()
    report = (sdir / "report.md").read_text()
    assert "### At the pruner's rungs" in report  # the rung studies were built
    assert "Step 5 (20 trials):" in report and "Step 10 (20 trials):" in report
    assert "4 complete, 16 pruned, 0 failed" in report
    assert f"dist-lm: wrote {sdir / 'report.md'}" in out
    messages = [r.getMessage() for r in optuna_info]
    assert not [m for m in messages if NEW_STUDY in m], messages
    assert NEW_STUDY not in out + err
    # the verbosity is the caller's again: a study of the user's own still says so
    assert optuna.logging.get_verbosity() == optuna.logging.INFO
    optuna.create_study(direction="minimize")
    assert any(NEW_STUDY in r.getMessage() for r in optuna_info)


def test_rung_studies_leave_warnings_on_and_a_quieter_verbosity_alone(optuna_info):
    from dist_lm.sweep.report import _optuna_quiet_info

    with _optuna_quiet_info():
        optuna.create_study(direction="minimize")
        logging.getLogger("optuna.study").warning("still shown")
    assert [r.getMessage() for r in optuna_info] == ["still shown"]
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with _optuna_quiet_info():
        assert optuna.logging.get_verbosity() == optuna.logging.ERROR
    assert optuna.logging.get_verbosity() == optuna.logging.ERROR
