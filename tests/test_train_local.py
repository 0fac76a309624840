"""In-process Trainer checks (local engine, tiny stand-in model): NT-ASGD switch and averaged
evaluation/checkpoint, finetune stop, batch-geometry errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _eval_helpers import one_thread  # noqa: E402,F401  (autouse: tiny models, one thread)
from train_helpers import make_trainer, tiny_config  # noqa: E402

from dist_lm.errors import UserError  # noqa: E402
from dist_lm.eval.evaluate import evaluate_stream  # noqa: E402
from dist_lm.runs import list_checkpoints  # noqa: E402


def rows(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ntasgd_switches_and_evaluates_with_average(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.max_steps": 8, "train.eval_every_steps": 2,
                                   "optim.nonmono": 1})
    tr = make_trainer(cfg)
    tr.ntasgd.history = [0.0, 0.0]  # earlier validations that were better: the next one triggers
    final = tr.fit()
    assert tr.ntasgd.averaging and tr.averager.count > 0
    events = [r.get("event") for r in rows(tmp_path) if "valid_loss" in r]
    assert "switch" in events
    ck = list_checkpoints(tmp_path)[-1]
    assert (ck / "averaged.pt").is_file()
    # the final validation used the averaged weights, not the live ones
    avg = torch.load(ck / "averaged.pt", weights_only=True)
    live = torch.load(ck / "model.pt", weights_only=True)
    tr.module.load_state_dict(avg)
    s, n = evaluate_stream(tr.module, tr.valid_loader, reduce=False)
    assert s / n == pytest.approx(final["valid_loss"], rel=1e-6)
    tr.module.load_state_dict(live)
    s2, n2 = evaluate_stream(tr.module, tr.valid_loader, reduce=False)
    assert s2 / n2 != pytest.approx(final["valid_loss"], rel=1e-6)


def test_finetune_stops_at_first_nonmonotone(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.max_steps": 20, "train.eval_every_steps": 2,
                                   "optim.nonmono": 1, "train.finetune": True})
    tr = make_trainer(cfg)
    assert tr.ntasgd.averaging  # finetune averages from the first step
    tr.ntasgd.history = [0.0, 0.0]
    tr.fit()
    assert tr.ntasgd.stop and tr.step == 2 and tr.averager.count == 2
    assert [r["event"] for r in rows(tmp_path) if "event" in r] == ["stop"]


def test_batch_geometry_errors(tmp_path):
    with pytest.raises(UserError, match="train.micro_batch"):
        make_trainer(tiny_config(tmp_path, **{"train.global_batch": 4, "train.micro_batch": 3}))
    tr = make_trainer(tiny_config(tmp_path, **{"train.global_batch": 4, "train.micro_batch": 2}))
    assert tr.accum == 2 and tr.micro == 2


def test_finetune_from_other_model_is_a_user_error(tmp_path):
    make_trainer(tiny_config(tmp_path / "a", **{"train.max_steps": 2})).fit()
    with pytest.raises(UserError, match="does not fit this model config"):
        make_trainer(tiny_config(tmp_path / "b", **{"model.emb_size": 8,
                                                    "train.finetune_from": str(tmp_path / "a")}))
