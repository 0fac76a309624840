"""schedule.scaling = adascale (issue 22): the lr gain is the measured noise scale's gain r (sqrt
r for adaptive optimizers), the schedule runs on progress tau += r, a max_steps run ends at tau,
resume is bit-exact, the refusals; the critical-batch line, the final record's b_noise and
`dist-lm compare`'s b_noise table column and plot."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers.cli import run_cli
from helpers.config import tiny_config
from helpers.runs import make_trainer, metrics
from helpers.runs import one_thread  # noqa: F401  (autouse: tiny models, one thread)

from dist_lm.config import ScheduleConfig, load_config
from dist_lm.errors import UserError
from dist_lm.metrics.compare import compare_command, plot_series, read_metrics
from dist_lm.train.noise_scale import critical_batch_advice
from dist_lm.train.optim import LRSchedule

# 4 streams in micro batches of 1 over a base batch of 2: r between 1 and 2
ADA = {"schedule.scaling": "adascale", "schedule.base_batch": 2, "train.micro_batch": 1,
       "train.variable_bptt": False, "train.max_steps": 6}


def _steps(run_dir):
    return [r for r in metrics(run_dir) if "grad_norm" in r]


def test_schedule_runs_on_tau_and_leaves_out_skipped_attempts():
    s = LRSchedule(ScheduleConfig(scaling="adascale", base_batch=2, warmup_steps=4), 1.0, 8,
                   "adam")
    s.set_gain(0, None)  # not measured yet: r = 1
    assert s.lr(0, 0.0, 0) == pytest.approx(1 / 4)
    s.set_gain(1, 4.0)  # step 0 applied with r = 1: tau 1
    assert s.steps_done(1) == 1.0 and s.lr(1, 0.0, 0) == pytest.approx(2 / 4 * 2.0)  # sqrt(4)
    assert s.steps_done(2) == 5.0  # once step 1 is applied
    s.set_gain(1, 9.0)  # step 1 left out (the counter stayed): its gain did not count
    assert s.steps_done(1) == 1.0 and s.steps_done(2) == 10.0
    s.set_gain(2, 1.0)
    assert s.tau == 10.0 and s.lr(2, 0.0, 0) == 1.0  # warm-up over (tau 10 >= 4)
    sd = s.state_dict()
    again = LRSchedule(ScheduleConfig(scaling="adascale", base_batch=2, warmup_steps=4), 1.0, 8,
                       "adam")
    again.load_state_dict(sd)
    assert (again.tau, again.tau_at, again.gain) == (10.0, 2, 1.0)
    assert LRSchedule(ScheduleConfig(scaling="sqrt", base_batch=2), 1.0, 8).steps_done(7) == 7


@pytest.mark.parametrize("optim,power", [("sgd", 1.0), ("adam", 0.5)])
def test_lr_is_the_measured_gain_and_the_run_ends_at_tau(tmp_path, ptb_slice, capsys, optim,
                                                         power):
    lr0 = 1.0 if optim == "sgd" else 0.01
    rd = tmp_path / "run"
    tr = make_trainer(tiny_config(rd, ptb_slice, **{**ADA, "optim.name": optim,
                                                            "optim.lr": lr0,
                                                            "train.max_steps": 8}))
    tr.fit()
    assert f"adascale rule (lr x {'r' if power == 1 else 'sqrt(r)'}" in capsys.readouterr().out
    res = json.loads((rd / "config.json").read_text())["resolved"]["lr_scaling"]
    assert (res["rule"], res["gain_power"], res["peak_lr"]) == ("adascale", power, lr0)
    rows = _steps(rd)
    # step s used the gain the estimator held after step s - 1 (1 before any estimate)
    gains, tau = [], 0.0
    for prev, row in zip([None] + rows[:-1], rows):
        bn = prev.get("b_noise") if prev else None
        r = 1.0 if bn is None else (1 + bn / 2) / (1 + bn / 4)
        assert row["lr"] == pytest.approx(lr0 * r ** power, rel=1e-12)
        gains.append(r)
        tau += r
    assert sum(g > 1 for g in gains) >= 2  # the estimate existed and raised the lr
    assert tr.schedule.steps_done(tr.step) == pytest.approx(tau, rel=1e-12)
    # the run ended at the first step where tau reached train.max_steps, before 8 steps
    assert tau >= 8 > tau - gains[-1] and len(rows) == tr.step < 8


def test_resume_of_an_adascale_run_is_bit_exact(tmp_path, ptb_slice):
    full = tmp_path / "full"
    a = make_trainer(tiny_config(full, ptb_slice, **ADA))
    a.fit()
    part = tmp_path / "part"
    make_trainer(tiny_config(part, ptb_slice, **{**ADA, "train.max_steps": 2})).fit()
    b = make_trainer(tiny_config(part, ptb_slice, **ADA))
    b.fit(resume="auto")
    keys = ("step", "lr", "loss", "b_noise")
    assert [[r.get(k) for k in keys] for r in _steps(part)] == \
        [[r.get(k) for k in keys] for r in _steps(full)]
    assert b.schedule.state_dict() == a.schedule.state_dict()
    for k, v in a.module.state_dict().items():
        assert torch.equal(v, b.module.state_dict()[k]), k


def test_refused_where_the_noise_scale_is_not_measured(tmp_path, ptb_slice):
    one = tmp_path / "one"  # 4 streams in one pass on one rank: no noise scale
    with pytest.raises(UserError, match="adascale needs the gradient noise scale.*"
                                        "--train.micro_batch"):
        make_trainer(tiny_config(one, ptb_slice, **{**ADA, "train.micro_batch": 0}))
    assert not one.exists()
    # the same through the real CLI: one line naming the fix, a non-zero exit, nothing written
    toml = tmp_path / "tiny.toml"
    toml.write_text("[model]\nemb_size = 16\nhidden_size = 24\n[train]\nglobal_batch = 4\n")
    proc = run_cli("train", toml, f"--data.shards={ptb_slice}", f"--train.run_dir={one}",
                   "--train.device=cpu", "--schedule.scaling=adascale",
                   "--log.wandb_mode=disabled", cwd=tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(err) == 1 and "adascale needs" in err[0] \
        and "--train.micro_batch" in err[0], err
    assert not one.exists()
    with pytest.raises(UserError, match="adascale reads.*DeepSpeed.*--dist.engine=ddp"):
        load_config(None, {"dist.engine": "deepspeed", "schedule.scaling": "adascale"})
    with pytest.raises(UserError, match="adascale reads.*noise_scale_every=0"):
        load_config(None, {"train.noise_scale_every": 0, "schedule.scaling": "adascale"})


def test_critical_batch_line_and_final_record(tmp_path, ptb_slice, capsys):
    line = critical_batch_advice(320, 52.0)
    # McCandlish et al.: E(320)/E(52) = (1 + 320/52) / 2, S(320)/S(52) = (1 + 52/320) / 2
    assert line.startswith("global batch 320 streams is 6.2x the measured critical batch 52 "
                           "(B_noise): expect about 3.6x the tokens of batch 52 for the same "
                           "loss, in 0.58x its steps")
    assert critical_batch_advice(200, 52.0) is None  # 3.8x: not far above
    assert critical_batch_advice(320, math.inf) is None
    assert "critical batch 0.8 " in critical_batch_advice(4, 0.8)
    for name, bn in (("near", 2.0), ("far", 0.8)):  # batch 4 is 2x, 5x the critical batch
        rd = tmp_path / name
        tr = make_trainer(tiny_config(rd, ptb_slice, **{"train.micro_batch": 1,
                                                        "train.max_steps": 4}))
        tr.noise.b_noise = lambda: bn  # the value the estimator reports, set
        capsys.readouterr()
        tr.fit()
        final = [r for r in metrics(rd) if r.get("final")][0]
        assert final["b_noise"] == tr.noise.b_noise() and final["b_noise_tokens"] == \
            pytest.approx(final["b_noise"] * 12)
        out = capsys.readouterr().out
        want = critical_batch_advice(4, final["b_noise"])
        assert final["b_noise"] == bn and (want is not None) == (bn < 1)
        assert out.count("critical batch") == (want is not None) and (not want or want in out)


def test_compare_plots_and_tabulates_b_noise(tmp_path, ptb_slice, capsys):
    runs = []
    for name, over in (("noise", {"train.micro_batch": 1}), ("plain", {})):
        make_trainer(tiny_config(tmp_path / name, ptb_slice,
                                 **{"train.max_steps": 4, **over})).fit()
        runs.append(str(tmp_path / name))
    records = {r: read_metrics(r) for r in runs}
    series = plot_series(records, "b_noise")
    want = [(r["tokens"], r["b_noise"]) for r in _steps(runs[0]) if "b_noise" in r]
    assert list(series) == [runs[0]] and series[runs[0]] == want and len(want) >= 2
    capsys.readouterr()
    compare_command(runs, out=str(tmp_path / "cmp"))
    table = capsys.readouterr().out.splitlines()
    cols = [c.strip() for c in table[0].strip("|").split("|")]
    cells = [[v.strip() for v in line.strip("|").split("|")] for line in table[2:4]]
    row = dict(zip(cols, [c for c in cells if c[0] == runs[0]][0]))
    assert [c for c in cells if c[0] == runs[1]][0][cols.index("b_noise")] == ""
    assert "b_noise" in cols and float(row["b_noise"]) == pytest.approx(want[-1][1], rel=1e-3)
    assert (tmp_path / "cmp" / "b_noise_vs_tokens.png").stat().st_size > 0


def test_critical_batch_line_is_printed_once_during_the_run(tmp_path, ptb_slice, capsys,
                                                            monkeypatch):
    """Once the estimate spans ADVICE_AFTER measured steps, the first validation prints the line
    (with its step) and later ones do not; the end of the run prints it again."""
    from dist_lm.train import runlog

    monkeypatch.setattr(runlog, "ADVICE_AFTER", 3)
    rd = tmp_path / "far"
    tr = make_trainer(tiny_config(rd, ptb_slice, **{"train.micro_batch": 1, "train.max_steps": 8,
                                                    "train.eval_every_steps": 2}))
    tr.noise.b_noise = lambda: 0.8  # batch 4 is 5x: far above
    capsys.readouterr()
    tr.fit()
    out = capsys.readouterr().out
    assert tr.noise.measured() == 8
    during = [ln for ln in out.splitlines() if ln.startswith("dist-lm: at step ")]
    assert during == [f"dist-lm: at step 4, {critical_batch_advice(4, 0.8)}"], out
    assert out.count("critical batch") == 2


def test_adascale_names_the_per_pass_masks_at_start(tmp_path, ptb_slice, capsys):
    """Weight drop and embedding dropout draw one mask per micro batch: the start of an
    adascale run says the noise scale counts their noise; without them it says nothing."""
    for name, extra in (("masks", {"model.wdrop": 0.2, "model.dropoute": 0.1}),
                        ("none", {"model.wdrop": 0.0, "model.dropoute": 0.0})):
        capsys.readouterr()
        make_trainer(tiny_config(tmp_path / name, ptb_slice, **{
            "train.micro_batch": 1, "train.max_steps": 1, "schedule.scaling": "adascale",
            **extra})).fit()
        out = capsys.readouterr().out
        notes = [ln for ln in out.splitlines() if ln.startswith("dist-lm: note:")]
        if name == "masks":
            assert len(notes) == 1 and "model.wdrop=0.2 and model.dropoute=0.1" in notes[0], out
        else:
            assert notes == [], out
