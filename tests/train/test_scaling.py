"""Large-batch scaling at the trainer level (docs/scaling.md): the start-of-run lines, the
resolved values in config.json, the automatically chosen micro batch (equal to the explicit
accumulation run, and to one pass per rank within float tolerance), and resume checks. Real
model, real StreamLoader, real PTB-slice shards (helpers.corpus)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.config import tiny_config
from helpers.runs import make_trainer, metrics

from dist_lm.config import from_dict
from dist_lm.errors import UserError
from dist_lm.train.geometry import auto_micro_batch, micro_token_cap


def test_auto_micro_batch_is_the_largest_divisor_under_the_cap():
    assert auto_micro_batch(320, 90, 16384) == 160     # 182 fit; 160 is the largest divisor
    assert auto_micro_batch(20, 90, 16384) == 20       # the recipe: no accumulation
    assert auto_micro_batch(12, 10, 55) == 4           # 5 fit, 4 divides 12
    assert auto_micro_batch(7, 100, 50) == 1           # even one stream exceeds: one per pass
    assert auto_micro_batch(320, 90, 0) == 320         # no cap
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert micro_token_cap(0, cpu) == 16384 and micro_token_cap(0, gpu) == 65536
    assert micro_token_cap(500, cpu) == 500 and micro_token_cap(-1, cpu) == 0


def _params(tr):
    return {k: v.detach().clone() for k, v in tr.module.state_dict().items()}


def _fit(run_dir, shards, **over):
    cfg = tiny_config(run_dir, shards, **{"train.global_batch": 8, "train.max_steps": 6, **over})
    tr = make_trainer(cfg)
    tr.fit()
    return tr


def test_auto_micro_batch_trains_like_explicit_accumulation(tmp_path, ptb_slice, capsys):
    # bptt 12, variable: windows up to 32 tokens, so a 64-token cap gives 2 streams x 4 passes
    auto = _fit(tmp_path / "auto", ptb_slice, **{"train.max_micro_tokens": 64})
    out = capsys.readouterr().out
    assert (auto.micro, auto.accum) == (2, 4)
    assert "dist-lm: micro batch 2 x 4 accumulation step(s) x 1 rank(s) = global batch 8 " \
           "(chosen: at most 64 tokens per pass, train.max_micro_tokens)" in out
    explicit = _fit(tmp_path / "explicit", ptb_slice, **{"train.micro_batch": 2})
    assert (explicit.micro, explicit.accum) == (2, 4)
    whole = _fit(tmp_path / "whole", ptb_slice, **{"train.max_micro_tokens": -1})
    assert (whole.micro, whole.accum) == (8, 1)
    a, e, w = _params(auto), _params(explicit), _params(whole)
    for k in a:
        assert torch.equal(a[k], e[k]), k  # the same geometry: bit for bit
        torch.testing.assert_close(a[k], w[k], rtol=1e-5, atol=1e-6)  # accumulation = one pass
    la = [r["loss"] for r in metrics(tmp_path / "auto") if "grad_norm" in r]
    lw = [r["loss"] for r in metrics(tmp_path / "whole") if "grad_norm" in r]
    assert len(la) == 6 and la == pytest.approx(lw, rel=1e-5)
    # the CPU default holds this small batch in one pass
    default = make_trainer(tiny_config(tmp_path / "default", ptb_slice,
                                       **{"train.global_batch": 8}))
    assert (default.micro, default.accum) == (8, 1)


def test_scaled_lr_is_printed_stored_and_applied(tmp_path, ptb_slice, capsys):
    # the recipe here is tiny_config's defaults (global batch 80, no file); 8 streams = 1/10x
    # would scale down, so set the base explicitly: 8 = 4x base 2
    rd = tmp_path / "run"
    tr = _fit(rd, ptb_slice, **{"schedule.scaling": "sqrt", "schedule.base_batch": 2,
                                "schedule.warmup_base_steps": 4, "train.variable_bptt": False})
    out = capsys.readouterr().out
    assert "dist-lm: lr 1 -> 2 for global batch 8 = 4x base 2, sqrt rule, warm-up 4 steps " \
           "(derived)" in out
    table = json.loads((rd / "config.json").read_text())
    res = table["resolved"]["lr_scaling"]
    assert res == {"rule": "sqrt", "base_batch": 2, "global_batch": 8, "ratio": 4.0,
                   "base_lr": 1.0, "peak_lr": 2.0, "warmup_steps": 4, "warmup_derived": True,
                   "legacy": False, "gain_power": 0.0}
    assert table["resolved"]["batch"]["micro_batch"] == 8
    assert from_dict(table).schedule.scaling == "sqrt"  # the block is not a config key
    # the lr the trainer applied: warm-up to the sqrt-scaled peak (fixed bptt: factor 1)
    lrs = [r["lr"] for r in metrics(rd) if "grad_norm" in r]
    assert lrs == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    assert tr.schedule.peak == 2.0


def test_resume_keeps_the_rule_and_the_micro_batch(tmp_path, ptb_slice):
    rd = tmp_path / "run"
    over = {"schedule.scaling": "sqrt", "schedule.base_batch": 2, "train.max_steps": 4,
            "checkpoint.every_steps": 2, "train.max_micro_tokens": 64}
    _fit(rd, ptb_slice, **over)
    before = (rd / "config.json").read_text()
    for change, match in (({"schedule.scaling": "linear"}, "--schedule.scaling=sqrt"),
                          ({"schedule.warmup_steps": 3}, "--schedule.warmup_steps=100"),
                          ({"train.max_micro_tokens": -1}, "--train.micro_batch=2")):
        cfg = tiny_config(rd, ptb_slice, **{"train.global_batch": 8, **over, **change,
                                            "train.max_steps": 6})
        with pytest.raises(UserError, match=match):
            make_trainer(cfg).fit(resume="auto")
        assert (rd / "config.json").read_text() == before  # refused before anything is written
    # the same config continues, and config.json keeps the same resolved block
    cfg = tiny_config(rd, ptb_slice, **{"train.global_batch": 8, **over, "train.max_steps": 6})
    tr = make_trainer(cfg)
    tr.fit(resume="auto")
    assert tr.step == 6
    assert json.loads((rd / "config.json").read_text())["resolved"] == \
        json.loads(before)["resolved"]
