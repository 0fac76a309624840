"""`dist-lm sweep` on real pieces: Optuna journal and SQLite storages, trials that are real
`dist-lm train` subprocesses of a tiny LSTM on the first lines of PTB (a few seconds each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from dist_lm.config import load_config
from dist_lm.errors import UserError
from dist_lm.sweep.space import load_spec

from helpers.cli import DIST_LM, REPO, assert_clean_failure, cli_env, run_cli
from helpers.config import LR_DROPOUT
from helpers.corpus import make_corpus, ptb_lines
from helpers.runs import metrics, wait_for

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data) -> Path:
    """The first lines of PTB as a text:DIR corpus (vocabulary of a few thousand words)."""
    return make_corpus(tmp_path_factory.mktemp("sweep-corpus"),
                       *(ptb_lines(shared_data, s, n) for s, n in (("train", 1500),
                                                                   ("valid", 200), ("test", 150))),
                       name="shards", chunk_len=65536)  # prepare's own chunks


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory) -> Path:
    """A tiny recipe: validation every 5 of 20 steps gives the pruner four values."""
    p = tmp_path_factory.mktemp("sweep-base") / "tiny.toml"
    p.write_text(f"""
[data]
shards = "{corpus}"
eval_batch_size = 10
test_batch_size = 10
[model]
emb_size = 16
hidden_size = 32
n_layers = 1
[optim]
lr = 20.0
[train]
device = "cpu"
global_batch = 10
bptt = 20
max_steps = 1000
[log]
every_steps = 5
progress = false
""")
    return p


@pytest.fixture()
def env(tmp_path):
    # one thread per trial: the machine's 2 cores are shared; the baseline file stays in tmp
    return cli_env(OMP_WAIT_POLICY="PASSIVE", DIST_LM_BASELINES=tmp_path / "baselines.json",
                   MPLCONFIGDIR=tmp_path / "mpl")


def study_file(path: Path, base: Path, study: str, space: str, extra: str = "") -> Path:
    path.write_text(f'[study]\nbase = "{base}"\nbudget = {{ steps = 20 }}\n'
                    f'eval_every_steps = 5\n{study}\n{space}\n{extra}\n')
    return path


def sweep(*args, env, cwd, timeout=240) -> subprocess.CompletedProcess:
    return run_cli("sweep", *args, env=env, cwd=cwd, timeout=timeout)


def load(study_dir: Path, name: str, storage: str | None = None):
    return optuna.load_study(study_name=name, storage=storage or JournalStorage(
        JournalFileBackend(str(study_dir / "study.journal"))))


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows; none before the trainer wrote one."""
    return metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []


# ---- bad input: one message, no trial ---------------------------------------------------

BAD_SPACES = [
    ('[space."optim.lrr"]\ntype = "loguniform"\nlow = 1\nhigh = 50', "Did you mean 'optim.lr'"),
    ('[space."model.n_layers"]\ntype = "uniform"\nlow = 1\nhigh = 3', 'use type = "int"'),
    ('[space."optim.lr"]\ntype = "loguniform"\nlow = 50\nhigh = 1', "empty range"),
    ('[space."optim.lr"]\ntype = "uniform"\nlow = 5\nhigh = 5', "empty range"),
    ('[space."optim.lr"]\ntype = "loguniform"\nlow = 0\nhigh = 5', "low > 0"),
    ('[space."model.arch"]\ntype = "categorical"\nchoices = []', "non-empty list"),
    ('[space."model.arch"]\ntype = "categorical"\nchoices = ["lstm", "transformer"]',
     "must be one of lstm, qrnn, gru"),
    ('[space."model.n_layers"]\ntype = "int"\nlow = 1\nhigh = "three"', "high must be a number"),
    ('[space."optim.lr"]\ntype = "logunifrom"\nlow = 1\nhigh = 5', "Did you mean 'loguniform'"),
    ('[space."model.qrnn_window"]\ntype = "categorical"\nchoices = [1, 2]\n'
     'when = { "model.arhc" = "qrnn" }', "Did you mean 'model.arch'"),
    ('[space."model.qrnn_window"]\ntype = "categorical"\nchoices = [1, 2]\n'
     'when = { "model.arch" = "qrnn" }\n'
     '[space."model.arch"]\ntype = "categorical"\nchoices = ["lstm", "qrnn"]', "defines later"),
    ('[space."model.arch"]\ntype = "categorical"\nchoices = ["lstm", "gru"]\n'
     '[space."model.qrnn_window"]\ntype = "categorical"\nchoices = [1, 2]\n'
     'when = { "model.arch" = "qrnn" }', "never true"),
    # a condition on a key outside the space: the recipe's value never meets it
    ('[[space."optim.lr"]]\ntype = "loguniform"\nlow = 1\nhigh = 2\n'
     'when = { "train.device" = "cpu" }\n[[space."optim.lr"]]\ntype = "loguniform"\nlow = 2\n'
     'high = 3\nwhen = { "train.device" = "cuda" }', "when train.device in ['cuda'] is never true"),
    ('[space."model.qrnn_window"]\ntype = "categorical"\nchoices = [1, 2]\n'
     'when = { "model.arch" = "qrnn" }', "never true: it is not in the space, and the recipe"),
    ('[space."train.run_dir"]\ntype = "categorical"\nchoices = ["a", "b"]', "set by the sweep"),
    ('[space."optim.lr"]\ntype = "loguniform"\nlow = 1\nhigh = 5\n[[enqueue]]\n"optim.wd" = 1',
     "not in the space"),
    ('[space."model.dropout"]\ntype = "uniform"\nlow = 0.2\nhigh = 1.5',
     "model.dropout = 1.5 is refused by the config: model.dropout must be in [0, 1)"),
    ('[space."model.n_layers"]\ntype = "int"\nlow = 0\nhigh = 3', "model.n_layers must be >= 1"),
]


@pytest.mark.parametrize("space,needle", BAD_SPACES, ids=[n for _, n in BAD_SPACES])
def test_bad_space_is_one_clear_error(tmp_path, base, space, needle):
    f = study_file(tmp_path / "s.toml", base, 'name = "bad"', space)
    with pytest.raises(UserError, match=None) as err:
        load_spec(f)
    assert needle in str(err.value)


def test_budget_becomes_train_overrides(tmp_path, base):
    for budget, expect in (("steps = 30", {"train.max_steps": 30}),
                           ("epochs = 2", {"train.epochs": 2, "train.max_steps": 0}),
                           ("seconds = 90", {"train.max_seconds": 90.0, "train.max_steps": 0})):
        f = study_file(tmp_path / "s.toml", base, 'name = "b"', LR_DROPOUT)
        f.write_text(f.read_text().replace("steps = 20", budget))
        assert load_spec(f).budget_overrides() == {**expect, "train.eval_every_steps": 5}


def test_empty_enqueue_point_is_refused(tmp_path, base):
    f = study_file(tmp_path / "s.toml", base, 'name = "e"', LR_DROPOUT, "[[enqueue]]\n")
    with pytest.raises(UserError, match="is empty"):
        load_spec(f)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs/sweeps").glob("*.toml")))
def test_example_study_files_are_valid(name):
    spec = load_spec(REPO / "configs" / "sweeps" / name)
    assert spec.base.is_file() and spec.params and spec.trials > 1


def test_conditional_keys_are_sampled_only_when_their_condition_holds(tmp_path, base):
    f = study_file(tmp_path / "s.toml", base, 'name = "c"', """
[space."model.arch"]
type = "categorical"
choices = ["lstm", "qrnn"]
[space."model.qrnn_window"]
type = "categorical"
choices = [1, 2]
when = { "model.arch" = "qrnn" }
[space."optim.betas"]
type = "categorical"
choices = [[0.0, 0.999], [0.9, 0.999]]
""")
    spec = load_spec(f)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    first = {"model.arch": "qrnn", "model.qrnn_window": 1, "optim.betas": [0.0, 0.999]}
    study.enqueue_trial(spec.optuna_params(first))
    trial = study.ask()
    assert spec.suggest(trial) == first  # an enqueued point comes back as written
    study.tell(trial, 1.0)
    seen = set()
    for _ in range(12):
        trial = study.ask()
        point = spec.suggest(trial)
        assert ("model.qrnn_window" in point) == (point["model.arch"] == "qrnn")
        assert point["optim.betas"] in ([0.0, 0.999], [0.9, 0.999])
        study.tell(trial, 1.0)
        seen.add(point["model.arch"])
    assert seen == {"lstm", "qrnn"}


OPTIM_VARIANTS = """
[space."optim.name"]
type = "categorical"
choices = ["sgd", "adam"]
[[space."optim.lr"]]
type = "loguniform"
low = 1
high = 60
when = { "optim.name" = "sgd" }
[[space."optim.lr"]]
type = "loguniform"
low = 3e-4
high = 1e-2
when = { "optim.name" = "adam" }
"""
LR_RANGE = {"sgd": (1, 60), "adam": (3e-4, 1e-2)}


def _variants(arch: str, *whens: str) -> str:
    """model.arch swept over `arch`, and one optim.lr variant per `when`."""
    out = f'[space."model.arch"]\ntype = "categorical"\nchoices = {arch}\n'
    for i, when in enumerate(whens):
        out += (f'[[space."optim.lr"]]\ntype = "loguniform"\nlow = {i + 1}\nhigh = {i + 2}\n'
                f'when = {when}\n')
    return out


EXCLUSIVE_VARIANTS = [  # (space, Optuna names of the variants)
    (OPTIM_VARIANTS, ["optim.lr[optim.name=sgd]", "optim.lr[optim.name=adam]"]),
    # a key only one condition names does not matter when a common key tells them apart
    (OPTIM_VARIANTS.replace('when = { "optim.name" = "sgd" }',
                            'when = { "optim.name" = "sgd", "model.dropout" = [0.4, 0.1] }'),
     ["optim.lr[optim.name=sgd, model.dropout=0.4|0.1]", "optim.lr[optim.name=adam]"]),
    # gru is a valid arch, but not one that this space samples
    (_variants('["lstm", "qrnn"]', '{ "model.arch" = ["lstm", "gru"] }',
               '{ "model.arch" = ["gru", "qrnn"] }'),
     ["optim.lr[model.arch=lstm|gru]", "optim.lr[model.arch=gru|qrnn]"]),
    # a key outside the space has the recipe's value (train.device = "cpu")
    (_variants('["lstm", "qrnn"]', '{ "train.device" = "cpu", "model.arch" = "lstm" }',
               '{ "model.arch" = "qrnn" }'),
     ["optim.lr[train.device=cpu, model.arch=lstm]", "optim.lr[model.arch=qrnn]"]),
]


@pytest.mark.parametrize("space,names", EXCLUSIVE_VARIANTS, ids=range(len(EXCLUSIVE_VARIANTS)))
def test_exclusive_variants_load_under_their_own_names(tmp_path, base, space, names):
    spec = load_spec(study_file(tmp_path / "s.toml", base, 'name = "v"', space))
    assert [p.name for p in spec.params if p.key == "optim.lr"] == names
    assert spec.keys().count("optim.lr") == 1


OVERLAPPING_VARIANTS = [
    OPTIM_VARIANTS.replace('"optim.name" = "adam"', '"optim.name" = ["adam", "sgd"]'),
    OPTIM_VARIANTS.replace('when = { "optim.name" = "adam" }\n', ""),  # always holds
    # conditions on different keys: sgd with qrnn holds both
    '[space."model.arch"]\ntype = "categorical"\nchoices = ["lstm", "qrnn"]\n'
    + OPTIM_VARIANTS.replace('when = { "optim.name" = "adam" }', 'when = { "model.arch" = "qrnn" }'),
    # the recipe's value of a key outside the space satisfies both
    _variants('["lstm"]', '{ "train.device" = "cpu" }', '{ "train.device" = ["cuda", "cpu"] }'),
]


@pytest.mark.parametrize("space", OVERLAPPING_VARIANTS, ids=range(len(OVERLAPPING_VARIANTS)))
def test_overlapping_variants_are_refused(tmp_path, base, space):
    f = study_file(tmp_path / "s.toml", base, 'name = "v"', space)
    with pytest.raises(UserError) as err:
        load_spec(f)
    assert '[[space."optim.lr"]]: variants #1' in str(err.value)
    assert "can hold in the same trial" in str(err.value)


@pytest.mark.parametrize("space,needle", [
    (OPTIM_VARIANTS.replace("low = 3e-4", "low = 3e-2"),
     '[[space."optim.lr"]] #2: empty range: low = 0.03 must be below high = 0.01'),
    (OPTIM_VARIANTS.replace("low = 1\n", "low = 1\nchoices = [1]\n"), '[[space."optim.lr"]] #1'),
    (OPTIM_VARIANTS + '[space.optim.lr]\ntype = "uniform"\nlow = 1\nhigh = 2\n',
     "optim.lr is in the space twice"),
    (OPTIM_VARIANTS.replace('"optim.name" = "adam"', '"optim.name" = "sgd"'),
     "the same as variant #1's"),
    (OPTIM_VARIANTS + '[[enqueue]]\n"optim.lr" = 0.001\n', "give optim.name too"),
    (OPTIM_VARIANTS + '[[enqueue]]\n"optim.lr" = 0.001\n"optim.name" = "adam"\n'
     '[[enqueue]]\n"optim.name" = "sgd"\n"optim.lr" = 0.001\n', None),  # numbers: Optuna's
])
def test_bad_variants_are_one_clear_error(tmp_path, base, space, needle):
    f = study_file(tmp_path / "s.toml", base, 'name = "v"', space)
    if needle is None:
        assert len(load_spec(f).enqueue) == 2
        return
    with pytest.raises(UserError) as err:
        load_spec(f)
    assert needle in str(err.value)


def test_cli_refuses_overlapping_variants_in_one_line(tmp_path, base, env):
    f = study_file(tmp_path / "s.toml", base, 'name = "o"', OVERLAPPING_VARIANTS[0])
    res = sweep(f, "--dir", tmp_path / "o", env=env, cwd=tmp_path)
    assert_clean_failure(res, '[[space."optim.lr"]]', "#1", "#2", "can hold in the same trial")
    assert not (tmp_path / "o").exists()


def test_variants_sample_the_range_whose_condition_holds(tmp_path, base):
    spec = load_spec(study_file(tmp_path / "s.toml", base, 'name = "v"', OPTIM_VARIANTS))
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "v.journal")))
    study = optuna.create_study(storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {"sgd": 0, "adam": 0}
    for _ in range(200):
        trial = study.ask()
        point = spec.suggest(trial)
        name = point["optim.name"]
        low, high = LR_RANGE[name]
        assert set(point) == {"optim.name", "optim.lr"} and low <= point["optim.lr"] <= high
        # one Optuna name per variant; mapped back, the plain config key
        assert trial.params == {"optim.name": name, f"optim.lr[optim.name={name}]":
                                point["optim.lr"]}
        assert spec.point_of(trial.params) == point
        assert spec.optuna_params(point) == trial.params
        over = spec.overrides(point)
        assert over["optim.lr"] == point["optim.lr"] and not any("[" in k for k in over)
        assert spec.config_table(point)["optim.name"] == name
        study.tell(trial, 1.0)
        seen[name] += 1
    assert min(seen.values()) > 50
    cfg = load_config(spec.base, spec.overrides(point))  # a trial's overrides are a config
    assert (cfg.optim.name, cfg.optim.lr) == (point["optim.name"], point["optim.lr"])


def test_variants_are_enqueued_and_retried_under_their_names(tmp_path, base):
    from dist_lm.sweep.study import retry_callback

    points = [{"optim.name": "adam", "optim.lr": 0.002}, {"optim.name": "sgd", "optim.lr": 30}]
    enqueue = "".join(f'[[enqueue]]\n"optim.name" = "{p["optim.name"]}"\n'
                      f'"optim.lr" = {p["optim.lr"]}\n' for p in points)
    spec = load_spec(study_file(tmp_path / "s.toml", base, 'name = "v"', OPTIM_VARIANTS,
                                enqueue))
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "v.journal")))
    study = optuna.create_study(storage=storage, sampler=optuna.samplers.TPESampler(seed=0))
    for point in spec.enqueue:
        study.enqueue_trial(spec.optuna_params(point), skip_if_exists=True)
    for point in spec.enqueue:  # not queued twice
        study.enqueue_trial(spec.optuna_params(point), skip_if_exists=True)
    assert len(study.get_trials()) == 2
    for expect in points:
        trial = study.ask()
        assert spec.suggest(trial) == {**expect, "optim.lr": float(expect["optim.lr"])}
        study.tell(trial, state=TrialState.FAIL)
        retry_callback(spec)(study, study._storage.get_trial(trial._trial_id))
    for expect in points:  # the re-queued trials sample the same variant and value
        trial = study.ask()
        assert spec.suggest(trial) == {**expect, "optim.lr": float(expect["optim.lr"])}
        study.tell(trial, 1.0)
    retried = study.get_trials()[2:]
    assert [t.system_attrs["retry_history"] for t in retried] == [[0], [1]]
    assert [t.params for t in retried] == [t.params for t in study.get_trials()[:2]]


def test_bad_study_table_is_refused(tmp_path, base):
    for study, needle in (('name = "x"\nobjectve = "valid_ppl"', "Did you mean 'objective'"),
                          ('name = "x"\nobjective = "test_ppl"', "study.objective"),
                          ('name = "x"\ntrials = 0', "study.trials")):
        f = study_file(tmp_path / "s.toml", base, study, LR_DROPOUT)
        with pytest.raises(UserError) as err:
            load_spec(f)
        assert needle in str(err.value)
    f = tmp_path / "b.toml"
    f.write_text(f'[study]\nname = "x"\nbase = "{base}"\nbudget = {{ hours = 2 }}\n{LR_DROPOUT}')
    with pytest.raises(UserError, match="study.budget"):
        load_spec(f)


def test_cli_refuses_bad_space_storage_and_pruner_before_any_trial(tmp_path, base, env):
    bad_key = study_file(tmp_path / "k.toml", base, 'name = "k"',
                         '[space."optim.lrr"]\ntype = "loguniform"\nlow = 1\nhigh = 50')
    res = sweep(bad_key, "--dir", tmp_path / "k", env=env, cwd=tmp_path)
    assert_clean_failure(res, "optim.lrr", "Did you mean 'optim.lr'")
    assert not (tmp_path / "k").exists()

    good = study_file(tmp_path / "g.toml", base, 'name = "g"', LR_DROPOUT)
    res = sweep(good, "--dir", tmp_path / "g", "--storage", "sqlite:////no/such/dir/s.db",
                env=env, cwd=tmp_path)
    assert_clean_failure(res, "cannot open the study storage sqlite:////no/such/dir/s.db")
    assert not (tmp_path / "g" / "trials").exists()

    taken = tmp_path / "taken"  # another study's directory: its trial dirs are not ours
    taken.mkdir()
    (taken / "study.json").write_text('{"name": "other"}')
    res = sweep(good, "--dir", taken, env=env, cwd=tmp_path)
    assert_clean_failure(res, "holds study 'other', not 'g'")
    assert sorted(p.name for p in taken.iterdir()) == ["study.json"]

    no_launcher = study_file(tmp_path / "l.toml", base, 'name = "l"\nlauncher = "nosuchrun -n 2"',
                             LR_DROPOUT)
    res = sweep(no_launcher, "--dir", tmp_path / "l", env=env, cwd=tmp_path)
    assert_clean_failure(res, "study.launcher: 'nosuchrun' is not a command")
    assert not (tmp_path / "l").exists()

    bad_pruner = study_file(tmp_path / "p.toml", base,
                            'name = "p"\npruner = { kind = "median", n_startup = 2 }', LR_DROPOUT)
    res = sweep(bad_pruner, "--dir", tmp_path / "p", env=env, cwd=tmp_path)
    assert_clean_failure(res, "study.pruner = median (MedianPruner)", "n_startup")
    assert not (tmp_path / "p" / "trials").exists()


# ---- studies ------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_workers_report_and_best_config_reproduces(tmp_path, base, env):
    f = study_file(tmp_path / "s.toml", base, 'name = "pair"\ntrials = 4\nworkers = 2\n'
                   'sampler = { kind = "random", seed = 3 }', LR_DROPOUT)
    sdir = tmp_path / "study"
    res = sweep(f, "--dir", sdir, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    trials = load(sdir, "pair").get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:  # each trial is an ordinary run: its own dir, config, metrics
        run_dir = sdir / "trials" / str(t.number)
        cfg = json.loads((run_dir / "config.json").read_text())
        assert cfg["optim"]["lr"] == t.params["optim.lr"]
        assert cfg["model"]["dropout"] == t.params["model.dropout"]
        assert cfg["train"]["max_steps"] == 20 and cfg["train"]["eval_every_steps"] == 5
        assert cfg["log"]["group"] == "pair" and f"trial-{t.number}" in cfg["log"]["tags"]
        final = [r for r in records(run_dir) if r.get("final")]
        assert len(final) == 1 and final[0]["valid_ppl"] == t.value
        assert sorted(t.intermediate_values) == [5, 10, 15, 20]
    # two at a time: some two trials ran during the same interval
    spans = [(t.datetime_start, t.datetime_complete) for t in trials]
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])

    res = sweep("report", sdir, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    report = (sdir / "report.md").read_text()
    best = min(trials, key=lambda t: t.value)
    assert f"Trial {best.number}: valid_ppl = **{best.value:.6g}**" in report
    assert "4 complete, 0 pruned, 0 failed" in report
    for evaluator in ("PED-ANOVA", "fANOVA"):
        assert f"| key | {evaluator} |" in report
    assert "| optim.lr |" in report and "| model.dropout |" in report
    for png in ("history.png", "importance-ped-anova.png", "importance-fanova.png",
                "parallel.png", "slice.png", "intermediate.png"):
        data = (sdir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"]({png})" in report

    # best.toml is a ready recipe: training it again gives the trial's value
    rerun = tmp_path / "rerun"
    p = run_cli("train", sdir / "best.toml", f"--train.run_dir={rerun}", env=env, cwd=tmp_path,
                timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    final = [r for r in records(rerun) if r.get("final")][0]
    assert final["valid_ppl"] == pytest.approx(best.value, rel=1e-6)


@pytest.mark.slow
def test_a_study_with_variants_runs_and_reports_the_plain_key(tmp_path, base, env):
    enqueue = ('[[enqueue]]\n"optim.name" = "adam"\n"optim.lr" = 0.005\n'
               '[[enqueue]]\n"optim.name" = "sgd"\n"optim.lr" = 20\n')
    f = study_file(tmp_path / "s.toml", base, 'name = "variants"\ntrials = 3\n'
                   'sampler = { kind = "random", seed = 1 }\npruner = "none"', OPTIM_VARIANTS,
                   enqueue)
    sdir = tmp_path / "study"
    res = sweep(f, "--dir", sdir, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    trials = load(sdir, "variants").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert [t.params["optim.name"] for t in trials[:2]] == ["adam", "sgd"]
    for t in trials:
        name = t.params["optim.name"]
        lr = t.params[f"optim.lr[optim.name={name}]"]
        assert LR_RANGE[name][0] <= lr <= LR_RANGE[name][1]
        assert t.user_attrs["point"] == {"optim.name": name, "optim.lr": lr}
        cfg = json.loads((sdir / "trials" / str(t.number) / "config.json").read_text())
        assert (cfg["optim"]["name"], cfg["optim"]["lr"]) == (name, lr)

    res = sweep("report", sdir, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    best = min(trials, key=lambda t: t.value)
    text = (sdir / "best.toml").read_text()
    assert "[" not in "".join(ln for ln in text.splitlines() if not ln.startswith(("#", "[")))
    cfg = load_config(sdir / "best.toml")
    assert (cfg.optim.name, cfg.optim.lr) == (best.user_attrs["point"]["optim.name"],
                                              best.user_attrs["point"]["optim.lr"])
    report = (sdir / "report.md").read_text()
    assert "| optim.lr[optim.name=sgd] | loguniform [1.0, 60.0] when optim.name in ['sgd'] |" \
        in report
    assert "| optim.lr[optim.name=adam] | loguniform [0.0003, 0.01]" in report
    assert "| rank | trial | valid_ppl | optim.name | optim.lr | seconds |" in report
    row = next(ln for ln in report.splitlines() if ln.startswith(f"| 1 | {best.number} |"))
    assert f"| {best.user_attrs['point']['optim.lr']:.4g} |" in row
    assert f"Trial {best.number}: valid_ppl = **{best.value:.6g}**" in report


@pytest.mark.slow
def test_pruned_failed_and_diverged_trials_and_the_study_goes_on(tmp_path, base, env):
    space = LR_DROPOUT.replace('"model.dropout"]\ntype = "uniform"\nlow = 0.0\nhigh = 0.5',
                               '"train.micro_batch"]\ntype = "categorical"\nchoices = [0, 3]')
    points = [(20, 0), (20, 3), (1e20, 0), (0.01, 0)]  # good, refused, NaN, bad
    enqueue = "".join(f'[[enqueue]]\n"optim.lr" = {lr}\n"train.micro_batch" = {mb}\n'
                      for lr, mb in points)
    f = study_file(tmp_path / "s.toml", base, 'name = "mixed"\ntrials = 4\n'
                   'pruner = { kind = "median", n_startup_trials = 1 }', space, enqueue)
    sdir = tmp_path / "study"
    res = sweep(f, "--dir", sdir, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    trials = load(sdir, "mixed").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL,
                                         TrialState.PRUNED]
    # the trainer's own refusal, as its last stderr line
    assert "train.micro_batch=3 does not divide" in trials[1].user_attrs["fail_reason"]
    # NaN: stopped by the sweep ("diverged: loss = nan") or by the trainer's own check
    reason = trials[2].user_attrs["fail_reason"]
    assert ("diverged: " in reason and "nan" in reason) or "non-finite loss" in reason, reason
    # NaN and pruning both stop the run early: no final record, fewer than 20 steps
    for t in trials[2:]:
        rows = records(sdir / "trials" / str(t.number))
        assert not any(r.get("final") for r in rows) and all(r["step"] < 20 for r in rows)
    assert records(sdir / "trials" / "3") and max(trials[3].intermediate_values) < 20

    res = sweep("report", sdir, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    report = (sdir / "report.md").read_text()
    assert "1 complete, 1 pruned, 2 failed" in report
    assert "does not divide" in report and reason.replace("|", "\\|") in report


def start_sweep(*args, env: dict, cwd: Path, **popen) -> subprocess.Popen:
    """`dist-lm sweep ARGS` in the background."""
    return subprocess.Popen([*DIST_LM, "sweep", *map(str, args)], env=env, cwd=cwd, **popen)


def _processes_with(text: str) -> list[int]:
    """Live processes whose command line contains `text` (Linux /proc)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the trainer's death with its sweep is Linux's "
                    "PR_SET_PDEATHSIG")
def test_killed_study_continues_and_requeues_the_interrupted_trial(tmp_path, base, env):
    f = study_file(tmp_path / "s.toml", base, 'name = "kill"\ntrials = 2\n'
                   'sampler = { kind = "random", seed = 5 }', LR_DROPOUT)
    sdir = tmp_path / "study"
    proc = start_sweep(f, "--dir", sdir, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    try:
        trainer = str(sdir / "trials" / "1")
        wait_for(lambda: _processes_with(trainer), 120, "trial 1's trainer to start")
        os.kill(proc.pid, signal.SIGKILL)  # mid-trial
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = (sdir / "trials" / "0" / "metrics.jsonl").read_bytes()
    # the trainer of trial 1 dies with its sweep (no orphan writing into the study)
    wait_for(lambda: not _processes_with(trainer), 30, "trial 1's trainer to end")
    assert not any(r.get("final") for r in records(sdir / "trials" / "1"))
    trials = load(sdir, "kill").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING]

    res = sweep(f, "--dir", sdir, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "re-queued interrupted trial(s) 1" in res.stdout
    trials = load(sdir, "kill").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                         TrialState.COMPLETE]
    assert trials[1].user_attrs["fail_reason"].startswith("interrupted")
    assert trials[2].params == trials[1].params
    assert trials[2].system_attrs["retry_history"] == [1]
    # the finished trial was not run again
    assert (sdir / "trials" / "0" / "metrics.jsonl").read_bytes() == first
    # (trial 1's run dir exists if its trainer got as far as creating it)
    assert sorted(p.name for p in (sdir / "trials").iterdir()) in (["0", "2"], ["0", "1", "2"])
    assert not any(r.get("final") for r in records(sdir / "trials" / "1"))

    res = sweep(f, "--dir", sdir, env=env, cwd=tmp_path)  # a finished study runs nothing
    assert res.returncode == 0 and "already has its 2 trials" in res.stdout
    assert len(load(sdir, "kill").get_trials()) == 3

    # a lost storage numbers trials from 0 again: trial 0's old run dir is overwritten, not
    # refused and not appended to
    (sdir / "study.journal").unlink()
    f.write_text(f.read_text().replace("seed = 5", "seed = 6"))  # another point this time
    res = sweep(f, "--dir", sdir, "--trials", 1, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (t0,) = load(sdir, "kill").get_trials()
    assert t0.state == TrialState.COMPLETE and t0.params != trials[0].params
    rows = records(sdir / "trials" / "0")
    assert [r["step"] for r in rows if "valid_loss" in r and not r.get("final")] == [5, 10, 15, 20]
    finals = [r for r in rows if r.get("final")]
    assert len(finals) == 1 and finals[0]["valid_ppl"] == t0.value  # the new run's, not the old
    cfg = json.loads((sdir / "trials" / "0" / "config.json").read_text())
    assert cfg["optim"]["lr"] == t0.params["optim.lr"]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="a process group's SIGINT, as a terminal's "
                    "Ctrl-C sends it")
def test_ctrl_c_stops_in_one_line_and_the_rerun_samples_a_new_point(tmp_path, base, env):
    f = study_file(tmp_path / "s.toml", base, 'name = "cc"\ntrials = 2\n'
                   'sampler = { kind = "random", seed = 5 }', LR_DROPOUT)
    sdir = tmp_path / "study"
    proc = start_sweep(f, "--dir", sdir, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: records(sdir / "trials" / "0"), 120, "trial 0 to train")
        os.killpg(proc.pid, signal.SIGINT)  # the sweep and its trainer, as Ctrl-C does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    # the hint repeats the --dir it was given
    assert f"re-queued for the next `dist-lm sweep {f} --dir {sdir}`" in err
    res = sweep(f, "--dir", sdir, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    trials = load(sdir, "cc").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE,
                                         TrialState.COMPLETE]
    assert trials[1].params == trials[0].params  # the interrupted point, re-queued
    # a sampler seeded as before replays its sequence: trial 2 would be trial 0's point again
    assert trials[2].params != trials[0].params


@pytest.mark.slow
def test_a_trainer_stopped_from_outside_is_run_again(tmp_path, base, env):
    """A preempted trainer (SIGTERM: it checkpoints and exits 75) is re-queued at once."""
    f = study_file(tmp_path / "s.toml", base, 'name = "pre"\ntrials = 1', LR_DROPOUT)
    f.write_text(f.read_text().replace("steps = 20", "steps = 60"))  # a few seconds of steps
    sdir = tmp_path / "study"
    proc = start_sweep(f, "--dir", sdir, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: records(sdir / "trials" / "0"), 120, "trial 0 to train")
        (pid,) = _processes_with(str(sdir / "trials" / "0"))
        os.kill(pid, signal.SIGTERM)  # the trainer only, as a cluster's preemption would
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    trials = load(sdir, "pre").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE], err[-3000:]
    assert trials[0].user_attrs["fail_reason"].startswith("interrupted")
    assert trials[1].params == trials[0].params
    assert trials[1].system_attrs["retry_history"] == [0]


@pytest.mark.slow
def test_two_sweep_processes_share_one_sqlite_study(tmp_path, base, env):
    f = study_file(tmp_path / "s.toml", base, 'name = "shared"\ntrials = 3\n'
                   'sampler = { kind = "random" }', LR_DROPOUT)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    procs = [start_sweep(f, "--dir", tmp_path / f"machine-{i}", "--storage", url, env=env,
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    trials = load(tmp_path, "shared", storage=url).get_trials()
    why = "\n".join(out[-1500:] + err[-1500:] for out, err in outs)
    # two workers finishing at the same moment may each start one more trial
    assert [t.number for t in trials] in ([0, 1, 2], [0, 1, 2, 3]), why
    assert all(t.state == TrialState.COMPLETE for t in trials), why
    dirs = {i: {int(p.name) for p in (tmp_path / f"machine-{i}" / "trials").iterdir()}
            for i in range(2)}
    assert dirs[0] and dirs[1] and not dirs[0] & dirs[1], why  # both worked, no number twice
    assert dirs[0] | dirs[1] == {t.number for t in trials}
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2


@pytest.mark.slow
def test_a_trial_can_run_under_torchrun(tmp_path, base, env):
    launcher = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2"
    f = study_file(tmp_path / "s.toml", base, f'name = "ddp"\ntrials = 1\nlauncher = "{launcher}"',
                   LR_DROPOUT, '[fixed]\n"dist.engine" = "ddp"\n')
    f.write_text(f.read_text().replace("steps = 20", "steps = 10"))
    sdir = tmp_path / "study"
    res = sweep(f, "--dir", sdir, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (t,) = load(sdir, "ddp").get_trials()
    assert t.state == TrialState.COMPLETE and sorted(t.intermediate_values) == [5, 10]
    rows = records(sdir / "trials" / "0")
    train = [r for r in rows if "tokens_per_s" in r]
    assert train and train[-1]["tokens_per_s"] == pytest.approx(
        2 * train[-1]["tokens_per_s_per_device"])  # two ranks
    cfg = json.loads((sdir / "trials" / "0" / "config.json").read_text())
    assert cfg["dist"]["engine"] == "ddp"


def test_rung_importances_count_pruned_trials():
    """With pruning, most trials never complete: the rung importances rank the keys on every
    trial's value at a shared validation step. Here `x` drives the value and `y` is noise;
    only 3 trials complete, 30 are pruned at step 50."""
    import math
    import random

    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from dist_lm.sweep.report import rung_importances

    rng = random.Random(0)
    study = optuna.create_study(direction="minimize")
    dists = {"x": FloatDistribution(0.0, 1.0), "y": FloatDistribution(0.0, 1.0)}
    for i in range(33):
        x, y = rng.random(), rng.random()
        at = {50: 100 + 400 * x + rng.random()}
        done = i < 3
        if done:
            at[100] = at[50] - 20
        study.add_trial(create_trial(
            params={"x": x, "y": y}, distributions=dists, intermediate_values=at,
            value=at[100] if done else None,
            state=TrialState.COMPLETE if done else TrialState.PRUNED))
    rungs = rung_importances(study, "valid_ppl", min_trials=10)
    assert [(step, n) for step, n, _ in rungs] == [(50, 33)]  # step 100: 3 trials, below 10
    for name, imp in rungs[0][2].items():
        assert not isinstance(imp, str), (name, imp)
        assert imp["x"] > 0.8 and imp["y"] < 0.2 and math.isclose(sum(imp.values()), 1, abs_tol=1e-6)
