"""In-process Trainer checks on the real path (RNNLanguageModel, StreamLoader, PTB-slice shards):
run directories (refusal, overwrite, lock, W&B id), the lr actually applied per schedule, epoch
milestones at the boundary, time budgets, the best checkpoint and the final test figure,
NT-ASGD, finetune, baselines."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from helpers.cli import REPO, run_cli
from helpers.config import tiny_config
from helpers.runs import make_trainer, metrics
from helpers.runs import one_thread  # noqa: F401  (autouse: tiny models, one thread)

from dist_lm.errors import UserError
from dist_lm.eval.windows import evaluate_stream
from dist_lm.run.directory import RunLock, run_id
from dist_lm.run.layout import (checkpoint_files, find_checkpoint, list_checkpoints, read_marker,
                                step_of)



def steps_of(run_dir) -> list[int]:
    return [step_of(p) for p in list_checkpoints(run_dir)]


# ---- run directories -----------------------------------------------------------------------

def test_fresh_run_into_existing_run_is_refused_and_overwrite_starts_clean(tmp_path, ptb_slice):
    rd = tmp_path / "run"
    make_trainer(tiny_config(rd, ptb_slice, **{"train.max_steps": 6,
                                               "checkpoint.every_steps": 2})).fit()
    assert steps_of(rd) == [2, 4, 6]
    first_id = run_id(rd)
    before = (rd / "metrics.jsonl").read_text()
    second = tiny_config(rd, ptb_slice, **{"train.max_steps": 2, "checkpoint.every_steps": 2})
    with pytest.raises(UserError, match="already holds a run.*--resume auto.*--overwrite"):
        make_trainer(second).fit()
    assert steps_of(rd) == [2, 4, 6] and (rd / "metrics.jsonl").read_text() == before
    make_trainer(second).fit(overwrite=True)
    assert steps_of(rd) == [2]  # only the new run's checkpoints
    assert max(r["step"] for r in metrics(rd)) == 2  # and only its metrics
    assert json.loads((rd / "config.json").read_text())["train"]["max_steps"] == 2
    assert run_id(rd) not in (None, first_id)  # a new run: a new W&B id
    with pytest.raises(UserError, match="contradict"):
        make_trainer(second).fit(resume="auto", overwrite=True)


def test_resume_keeps_the_run_id_and_truncates_metrics_to_the_checkpoint(tmp_path, ptb_slice):
    rd = tmp_path / "run"
    cfg = tiny_config(rd, ptb_slice, **{"train.max_steps": 4, "checkpoint.every_steps": 2})
    make_trainer(cfg).fit()
    rid = run_id(rd)
    # a killed run wrote records past its last checkpoint (step 4): a resume must drop them
    with open(rd / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + '{"step": 6, "lo')
    cfg2 = tiny_config(rd, ptb_slice, **{"train.max_steps": 6, "checkpoint.every_steps": 2})
    make_trainer(cfg2).fit(resume="auto")
    assert run_id(rd) == rid
    rows = metrics(rd)
    train_steps = [r["step"] for r in rows if "loss" in r and "valid_loss" not in r]
    assert train_steps == [1, 2, 3, 4, 5, 6]  # each step once, none from the "killed" tail
    assert [r["step"] for r in rows if r.get("final")] == [6]


def test_second_writer_is_refused_by_the_lock(tmp_path, ptb_slice):
    rd = tmp_path / "run"
    lock = RunLock(rd)
    lock.acquire()  # as a running `dist-lm train` holds it
    try:
        toml = tmp_path / "c.toml"
        toml.write_text("")
        p = run_cli("train", toml, f"--data.shards={ptb_slice}", f"--train.run_dir={rd}",
                    "--train.max_steps=1", "--model.emb_size=8", "--model.hidden_size=8",
                    "--train.global_batch=2", "--train.bptt=8", cwd=REPO, timeout=120)
        assert p.returncode != 0
        assert "in use by another dist-lm train" in p.stderr and "Traceback" not in p.stderr
        assert sorted(x.name for x in rd.iterdir()) == [".lock"]  # nothing written
    finally:
        lock.release()


def test_refused_start_leaves_nothing_behind(tmp_path, ptb_slice):
    other = tmp_path / "two-rank-ckpt"
    make_trainer(tiny_config(other, ptb_slice, **{"train.max_steps": 2})).fit()
    rd = tmp_path / "new"
    with pytest.raises(UserError, match="train.global_batch=4"):
        make_trainer(tiny_config(rd, ptb_slice, **{"train.global_batch": 2})).fit(
            resume=str(other))
    assert not rd.exists()


# ---- learning rate per step, read back from the optimizer ----------------------------------

def applied_lrs(tr):
    """(step, epoch, seq_len, lr in the optimizer) for every step fit() takes."""
    rec, inner = [], tr.train_step

    def spy(inputs, targets):
        step, epoch = tr.step, tr.epoch
        out = inner(inputs, targets)
        rec.append((step, epoch, inputs.shape[0], tr.engine.optimizer.param_groups[0]["lr"]))
        return out

    tr.train_step = spy
    return rec


def step_clock(tr):
    """A deterministic clock for `tr`: ten seconds per optimizer step of this process, counted
    from the moment the step starts (nothing else takes time)."""
    started, inner = [0], tr.train_step

    def counting(inputs, targets):
        started[0] += 1
        return inner(inputs, targets)

    tr.train_step = counting
    tr.clock = lambda: 10.0 * started[0]


def test_epoch_milestones_take_effect_exactly_at_the_epoch_boundary(tmp_path, ptb_slice):
    cfg = tiny_config(tmp_path, ptb_slice, **{"train.max_steps": 0, "train.epochs": 3,
                                              "schedule.kind": "step", "schedule.milestones": [1, 2],
                                              "schedule.gamma": 0.1, "optim.lr": 2.0})
    tr = make_trainer(cfg)
    rec = applied_lrs(tr)
    tr.fit()
    bptt = cfg.train.bptt
    assert {e for _, e, _, _ in rec} == {0, 1, 2}
    for step, epoch, seq_len, lr in rec:
        assert lr == pytest.approx(2.0 * 0.1 ** epoch * seq_len / bptt, rel=1e-12), (step, epoch)
    # every step of epoch 0 ran undecayed, the estimate of steps per epoch notwithstanding
    n0 = sum(1 for _, e, _, _ in rec if e == 0)
    assert n0 > tr.steps_per_epoch - 3  # the estimate is close, but not what fires the decay


@pytest.mark.parametrize("kind", ["fixed_time", "cosine", "warmup"])
def test_applied_lr_is_schedule_of_progress_times_seq_len_over_bptt(tmp_path, ptb_slice, kind):
    """Time-bounded: progress = elapsed / max_seconds (a clock of 10 s per step, 300 s budget =
    30 steps), so fractional milestones and cosine follow the clock."""
    over = {"train.max_steps": 0, "train.epochs": 1000, "train.max_seconds": 300.0,
            "optim.lr": 3.0}
    if kind == "fixed_time":
        over.update({"schedule.kind": "step", "schedule.milestones": [0.5, 0.75],
                     "schedule.gamma": 0.5})
    elif kind == "cosine":
        over.update({"schedule.kind": "cosine", "schedule.min_lr": 0.3})
    else:
        over.update({"schedule.kind": "constant", "schedule.warmup_steps": 5})
    tr = make_trainer(tiny_config(tmp_path, ptb_slice, **over))
    step_clock(tr)
    rec = applied_lrs(tr)
    final = tr.fit()
    assert final["stop"] == "max_seconds" and len(rec) == 30
    for step, _, seq_len, lr in rec:
        p = 10.0 * step / 300.0  # the clock at the step's start, as a fraction of the budget
        if kind == "fixed_time":
            want = 3.0 * (0.5 if p >= 0.5 else 1.0) * (0.5 if p >= 0.75 else 1.0)
        elif kind == "cosine":
            want = 0.3 + (3.0 - 0.3) * 0.5 * (1 + math.cos(math.pi * p))
        else:
            want = 3.0 * min(1.0, (step + 1) / 5)
        assert lr == pytest.approx(want * seq_len / 12, rel=1e-12), (kind, step)


def test_step_bounded_progress_is_the_fraction_of_steps(tmp_path, ptb_slice):
    cfg = tiny_config(tmp_path, ptb_slice, **{"train.max_steps": 10, "schedule.kind": "step",
                                              "schedule.milestones": [0.5], "optim.lr": 1.0})
    tr = make_trainer(cfg)
    rec = applied_lrs(tr)
    tr.fit()
    assert [round(lr * 12 / sl, 12) for _, _, sl, lr in rec] == [1.0] * 5 + [0.1] * 5


# ---- time budget ---------------------------------------------------------------------------

def test_time_budget_holds_across_resume(tmp_path, ptb_slice):
    """max_seconds is the run's budget over resumes: elapsed time is in every checkpoint."""
    rd = tmp_path / "run"
    over = {"train.max_steps": 0, "train.epochs": 1000, "train.max_seconds": 200.0,
            "checkpoint.every_steps": 4}
    tr = make_trainer(tiny_config(rd, ptb_slice, **{**over, "train.max_seconds": 80.0}))
    step_clock(tr)
    tr.fit()  # a first leg stopped after 8 steps (80 s)
    st = torch.load(list_checkpoints(rd)[-1] / "trainer.pt", weights_only=True)
    assert st["trainer"]["elapsed"] == pytest.approx(80.0)
    tr2 = make_trainer(tiny_config(rd, ptb_slice, **over))
    step_clock(tr2)  # a new process: its clock starts at 0 again
    final = tr2.fit(resume="auto")
    assert final["stop"] == "max_seconds" and final["step"] == 20  # 8 + 12 steps = 200 s
    elapsed = [r["elapsed_s"] for r in metrics(rd) if "loss" in r and "valid_loss" not in r]
    assert elapsed == pytest.approx([10.0 * k for k in range(1, 21)])  # continuous, no restart


# ---- best checkpoint and the final test figure ---------------------------------------------

def test_final_test_uses_best_checkpoint_and_pruning_keeps_it(tmp_path, ptb_slice):
    rd = tmp_path / "run"
    # lr so high the model gets worse after a few validations: the best is not the last
    cfg = tiny_config(rd, ptb_slice, **{"train.max_steps": 40, "train.eval_every_steps": 4,
                                        "checkpoint.every_steps": 4, "checkpoint.keep_last": 1,
                                        "optim.lr": 30.0, "optim.clip": 0.0,
                                        "optim.nt_asgd": False})
    final = make_trainer(cfg).fit()
    vals = [(r["step"], r["valid_loss"]) for r in metrics(rd)
            if "valid_loss" in r and not r.get("final")]
    best_step = min(vals, key=lambda v: v[1])[0]
    assert best_step != 40, vals  # the scenario needs a best before the end
    assert final["best_step"] == best_step and final["valid_loss"] == min(v for _, v in vals)
    assert steps_of(rd) == sorted({best_step, 40})  # keep_last 1 plus the best
    assert read_marker(list_checkpoints(rd)[-1])["best_step"] == best_step
    assert find_checkpoint(rd).name == f"step-{best_step:08d}"
    assert find_checkpoint(rd, "latest").name == "step-00000040"
    p = run_cli("eval", rd, "--split", "test", cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads((rd / "checkpoints" / f"step-{best_step:08d}" / "eval-test.json").read_text())
    assert res["nll"] == pytest.approx(final["test_loss"], rel=1e-9)


# ---- NT-ASGD, finetune, geometry -----------------------------------------------------------

def test_ntasgd_switches_and_evaluates_with_average(tmp_path, ptb_slice):
    cfg = tiny_config(tmp_path, ptb_slice, **{"train.max_steps": 8, "train.eval_every_steps": 2,
                                              "optim.nonmono": 1})
    tr = make_trainer(cfg)
    tr.ntasgd.history = [0.0, 0.0]  # earlier validations that were better: the next one triggers
    final = tr.fit()
    assert tr.ntasgd.averaging and tr.averager.count > 0
    events = [r.get("event") for r in metrics(tmp_path) if "valid_loss" in r]
    assert "switch" in events
    ck = list_checkpoints(tmp_path)[-1]
    assert (ck / "averaged.pt").is_file()
    # the last validation used the averaged weights, not the live ones
    last_val = [r for r in metrics(tmp_path) if "valid_loss" in r and not r.get("final")][-1]
    avg = torch.load(ck / "averaged.pt", weights_only=True)
    live = torch.load(ck / "model.pt", weights_only=True)
    tr.module.load_state_dict(avg)
    s, n = evaluate_stream(tr.module, tr.valid_loader, reduce=False)
    assert s / n == pytest.approx(last_val["valid_loss"], rel=1e-9)
    tr.module.load_state_dict(live)
    s2, n2 = evaluate_stream(tr.module, tr.valid_loader, reduce=False)
    assert s2 / n2 != pytest.approx(last_val["valid_loss"], rel=1e-6)
    assert final["stop"] == "max_steps"


def test_finetune_stops_at_first_nonmonotone(tmp_path, ptb_slice):
    cfg = tiny_config(tmp_path, ptb_slice, **{"train.max_steps": 20, "train.eval_every_steps": 2,
                                              "optim.nonmono": 1, "train.finetune": True})
    tr = make_trainer(cfg)
    assert tr.ntasgd.averaging  # finetune averages from the first step
    tr.ntasgd.history = [0.0, 0.0]
    final = tr.fit()
    assert tr.ntasgd.stop and tr.step == 2 and tr.averager.count == 2
    assert [r["event"] for r in metrics(tmp_path) if "event" in r] == ["stop"]
    assert final["stop"] == "nt-asgd"


def test_target_ppl_stops_and_records_time_to_target(tmp_path, ptb_slice):
    cfg = tiny_config(tmp_path, ptb_slice, **{"train.max_steps": 200,
                                              "train.eval_every_steps": 5,
                                              "train.target_ppl": 60.0, "optim.lr": 3.0})
    tr = make_trainer(cfg)
    step_clock(tr)
    final = tr.fit()
    vals = [r for r in metrics(tmp_path) if "valid_ppl" in r and not r.get("final")]
    hit = next(r for r in vals if r["valid_ppl"] <= 60.0)
    assert final["stop"] == "target" and tr.step == hit["step"] < 200
    assert final["time_to_target_s"] == pytest.approx(10.0 * hit["step"])
    assert final["tokens_to_target"] == hit["tokens"] and hit["event"] == "target"
    from dist_lm.metrics.compare import compare_command

    compare_command([str(tmp_path)], out=str(tmp_path / "cmp"))
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    col = table[0].split(" | ").index("time_to_target_s")  # a "time to target" column
    assert float(table[2].split(" | ")[col]) == pytest.approx(10.0 * hit["step"], rel=1e-3)


def test_batch_geometry_errors(tmp_path, ptb_slice):
    with pytest.raises(UserError, match="train.micro_batch"):
        make_trainer(tiny_config(tmp_path, ptb_slice, **{"train.global_batch": 4,
                                                         "train.micro_batch": 3}))
    tr = make_trainer(tiny_config(tmp_path, ptb_slice, **{"train.global_batch": 4,
                                                          "train.micro_batch": 2}))
    assert tr.accum == 2 and tr.micro == 2


def test_finetune_from_other_model_is_a_user_error(tmp_path, ptb_slice):
    make_trainer(tiny_config(tmp_path / "a", ptb_slice, **{"train.max_steps": 2})).fit()
    with pytest.raises(UserError, match="does not fit this model config"):
        make_trainer(tiny_config(tmp_path / "b", ptb_slice, **{
            "model.emb_size": 8, "train.finetune_from": str(tmp_path / "a")}))


def test_checkpoint_of_another_format_is_refused(tmp_path, ptb_slice):
    rd = tmp_path / "run"
    make_trainer(tiny_config(rd, ptb_slice, **{"train.max_steps": 2})).fit()
    ck = list_checkpoints(rd)[-1]
    st = torch.load(ck / "trainer.pt", weights_only=True)
    st["format"] = 1
    torch.save(st, ck / "trainer.pt")
    marker = read_marker(ck)  # a whole checkpoint of another version: its digests match
    marker["files"] = checkpoint_files(ck)
    (ck / "DONE").write_text(json.dumps(marker))
    with pytest.raises(UserError, match="checkpoint format 1.*finetune_from"):
        make_trainer(tiny_config(rd, ptb_slice, **{"train.max_steps": 4})).fit(resume="auto")


# ---- scaling-efficiency baselines ----------------------------------------------------------

def test_single_device_runs_record_a_baseline_only_when_asked(tmp_path, ptb_slice):
    from dist_lm.metrics.baselines import baselines_path, read_baseline

    path = baselines_path()
    assert str(path).startswith(os.environ["HOME"])  # tests never touch the user's home
    before = path.read_text() if path.is_file() else None
    tr = make_trainer(tiny_config(tmp_path / "a", ptb_slice, **{"train.max_steps": 3}))
    tr.fit()
    assert (path.read_text() if path.is_file() else None) == before
    tr2 = make_trainer(tiny_config(tmp_path / "b", ptb_slice, **{"train.max_steps": 3,
                                                                 "train.record_baseline": True}))
    tr2.fit()
    assert read_baseline(tr2._baseline_key()) > 0
    # another vocabulary, micro-batch or dtype is another key
    tr3 = make_trainer(tiny_config(tmp_path / "c", ptb_slice, **{"train.bptt": 10}))
    assert tr3._baseline_key() != tr2._baseline_key()
    assert not any("scaling_efficiency" in r for r in metrics(tmp_path / "b"))


def test_data_shard_url_reads_the_same_streams(tmp_path, ptb_slice):
    """data.shard_url (any WebDataset URL; here a pipe: command) feeds the same windows as the
    local shards: the trained parameters are identical."""
    over = {"train.max_steps": 5, "train.variable_bptt": True}
    a = make_trainer(tiny_config(tmp_path / "a", ptb_slice, **over))
    a.fit()
    b = make_trainer(tiny_config(tmp_path / "b", ptb_slice, **over,
                                 **{"data.shard_url": f"pipe:cat {ptb_slice}/{{name}}"}))
    assert b.train_loader.shard_url is not None
    b.fit()
    for k, v in a.module.state_dict().items():
        assert torch.equal(b.module.state_dict()[k], v), k


# ---- a failed start writes nothing; the final records tell the truth ----------------------

def test_failed_start_writes_nothing(tmp_path, ptb_slice):
    """A damaged shard or a bad --resume value stops train before config.json, vocab.json or
    metrics.jsonl exist (and a directory the run would have created does not appear)."""
    from helpers.corpus import corrupt_copy

    bad = corrupt_copy(ptb_slice, tmp_path / "bad-shards", "test-000000.tar", 700)
    rd = tmp_path / "run"
    with pytest.raises(UserError, match="test-000000.tar"):
        make_trainer(tiny_config(rd, bad)).fit()
    assert not rd.exists()
    with pytest.raises(UserError, match="does not exist"):
        make_trainer(tiny_config(rd, ptb_slice)).fit(resume=str(tmp_path / "nowhere"))
    assert not rd.exists()


def test_final_records_count_the_end_of_run_validation_and_real_epochs(tmp_path, ptb_slice):
    """Stopped by max_steps mid-epoch: the end-of-run validation is in W&B's best_valid_* (the
    summary), the final epoch is the fraction reached, and config.json names the corpus the
    shards were prepared from (data.corpus said "ptb")."""
    tr = make_trainer(tiny_config(tmp_path, ptb_slice, **{"train.max_steps": 10}))
    final = tr.fit()
    vals = [r for r in metrics(tmp_path) if "valid_loss" in r and not r.get("final")]
    assert [r["step"] for r in vals] == [10]  # no epoch ended: only the end-of-run validation
    assert tr.sink.summary["best_valid_ppl"] == pytest.approx(vals[0]["valid_ppl"])
    assert final["epoch"] == pytest.approx(10 / tr.steps_per_epoch) and 0 < final["epoch"] < 1
    corpus = json.loads((tmp_path / "config.json").read_text())["data"]["corpus"]
    manifest = json.loads((ptb_slice / "manifest.json").read_text())
    assert corpus == manifest["corpus"] != "ptb"
