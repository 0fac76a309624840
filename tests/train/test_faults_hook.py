"""The fault tests' hook (dist_lm.train.faults.Faults): read from the environment once, or
installed by a test; what it fires in a real run."""

from __future__ import annotations

from helpers.config import tiny_config
from helpers.runs import make_trainer, metrics

from dist_lm.train.faults import FAULT_RANK_ENV, KILL_ENV, NAN_ENV, Faults


def test_faults_are_read_from_the_environment_for_their_rank_only(monkeypatch):
    for k in (KILL_ENV, NAN_ENV, FAULT_RANK_ENV, "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    assert Faults.from_env(0) == Faults()  # nothing set: nothing fires
    monkeypatch.setenv(KILL_ENV, "7")
    monkeypatch.setenv(NAN_ENV, "3, 5,5")
    assert Faults.from_env(0) == Faults(7, [3, 5, 5]) == Faults.from_env(1)
    monkeypatch.setenv(FAULT_RANK_ENV, "1")
    assert Faults.from_env(0) == Faults() and Faults.from_env(1) == Faults(7, [3, 5, 5])
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun's restart: no fault again
    assert Faults.from_env(1) == Faults()


def test_each_listed_nan_fires_once_and_the_kill_only_at_its_step():
    f = Faults(kill_at=4, nan_at=[2, 5, 5])
    assert [f.nan_loss(s) for s in (1, 2, 2, 5, 5, 5)] == [False, True, False, True, True, False]
    assert f.nan_at == []
    assert [f.kills_at(s) for s in (3, 4, 5)] == [False, True, False]
    assert not Faults().kills_at(0)


def test_an_installed_hook_poisons_the_listed_step_of_a_real_run(tmp_path, ptb_slice):
    faults = Faults(nan_at=[3])
    tr = make_trainer(tiny_config(tmp_path, ptb_slice, **{"train.max_steps": 4}), faults=faults)
    final = tr.fit()
    events = [r for r in metrics(tmp_path) if r.get("event") == "non-finite"]
    assert [(e["step"], e["skipped_steps"]) for e in events] == [(2, 1)]  # before step 3
    assert final["step"] == 4 and faults.nan_at == []
