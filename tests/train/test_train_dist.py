"""1 rank vs 2 ranks (DDP) vs DeepSpeed ZeRO 0/1/2 on CPU/gloo, and exact resume after SIGKILL,
on the real path: RNNLanguageModel (LSTM and QRNN) and StreamLoader over real PTB-slice shards.

Runs go through tests/helpers/train_entry.py in subprocesses (torchrun for 2 ranks), one thread
each.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.cli import REPO, TRAIN_ENTRY, cli_env, run_ok, torchrun
from helpers.config import tiny_config
from helpers.runs import TIMING, make_trainer, metrics

from dist_lm.errors import UserError
from dist_lm.run.layout import list_checkpoints, step_of

pytestmark = pytest.mark.slow


def run(tmp: Path, name: str, nproc: int, shards: Path, *args: str, kill: int = 0,
        check: bool = True):
    """tests/helpers/train_entry.py OUT=tmp/name (under torchrun for 2 ranks); `kill`: the
    step after which the fault injection SIGKILLs the run."""
    head = [sys.executable] if nproc == 1 else torchrun(nproc)
    cmd = [*head, str(TRAIN_ENTRY), str(tmp / name), f"data.shards={shards}", *args]
    fault = {"DIST_LM_FAULT_KILL_AT_STEP": kill or None}
    if check:
        return run_ok(cmd, **fault)
    return subprocess.run(cmd, env=cli_env(fault), cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def result(tmp: Path, name: str, rank: int = 0) -> dict:
    return torch.load(tmp / f"{name}.rank{rank}.pt", weights_only=True)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir) if "loss" in r and "valid_loss" not in r]


STEPS = "train.max_steps=6"
SAME = ("train.variable_bptt=true", STEPS)


@pytest.fixture(scope="module")
def single(tmp_path_factory, ptb_slice):
    tmp = tmp_path_factory.mktemp("single")
    run(tmp, "one", 1, ptb_slice, f"train.run_dir={tmp/'one'}", *SAME)
    return tmp


def assert_same_curve(a: list[float], b: list[float]):
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)


def assert_ranks_identical(tmp, name):
    r0, r1 = result(tmp, name, 0), result(tmp, name, 1)
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    assert r0["loader"]["rng"] == r1["loader"]["rng"]  # random BPTT windows agree on every rank


def test_ddp_two_ranks_match_one(single, tmp_path, ptb_slice):
    run(tmp_path, "ddp", 2, ptb_slice, f"train.run_dir={tmp_path/'ddp'}", "dist.engine=ddp",
        "train.micro_batch=1", *SAME)  # 2 ranks x 2 accumulation steps x 1 stream
    assert_same_curve(losses(single / "one"), losses(tmp_path / "ddp"))
    assert_ranks_identical(tmp_path, "ddp")
    one, two = result(single, "one"), result(tmp_path, "ddp")
    assert one["loader"]["rng"] == two["loader"]["rng"]
    for k, v in one["params"].items():
        torch.testing.assert_close(two["params"][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_zero_matches(single, tmp_path, ptb_slice, stage):
    run(tmp_path, "ds", 2, ptb_slice, f"train.run_dir={tmp_path/'ds'}", "dist.engine=deepspeed",
        f"dist.zero_stage={stage}", *SAME)
    assert_same_curve(losses(single / "one"), losses(tmp_path / "ds"))
    assert_ranks_identical(tmp_path, "ds")
    assert (tmp_path / "ds" / "checkpoints" / "step-00000006" / "DONE").is_file()
    assert (tmp_path / "ds" / "checkpoints" / "step-00000006" / "model.pt").is_file()


@pytest.mark.parametrize("scaling", ["none", "adascale"])
def test_ddp_noise_scale_equals_its_accumulation_twin(tmp_path, ptb_slice, scaling):
    """B_noise from 2 ranks' local gradients (1 pass of 2 streams each) against one process
    accumulating the same 2 passes: the same micro batches, the same estimate. With adascale
    the lr follows the measured gain, so the twins' lr, loss and final weights agree too."""
    args = ("train.micro_batch=2", "train.max_steps=5", "schedule.base_batch=2",
            f"schedule.scaling={scaling}")
    run(tmp_path, "acc", 1, ptb_slice, f"train.run_dir={tmp_path/'acc'}", *args)
    run(tmp_path, "ddp", 2, ptb_slice, f"train.run_dir={tmp_path/'ddp'}", "dist.engine=ddp",
        *args)
    keys = ("b_noise", "b_noise_tokens", "adascale_gain")
    # the interval records (the final record carries b_noise too, without the gain)
    rows = [[r for r in metrics(tmp_path / d) if "b_noise" in r and not r.get("final")]
            for d in ("acc", "ddp")]
    assert len(rows[0]) == len(rows[1]) >= 3
    for a, b in zip(*rows):
        assert a["step"] == b["step"]
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-7), (k, a, b)
    last = [[r for r in metrics(tmp_path / d) if r.get("final")][0] for d in ("acc", "ddp")]
    assert last[1]["b_noise"] == pytest.approx(last[0]["b_noise"], rel=1e-7)
    if scaling == "adascale":
        assert any(r["adascale_gain"] > 1.0 for r in rows[0])  # the gain moved the lr
        assert len({r["lr"] for r in rows[0]}) > 1
        for a, b in zip(*rows):
            assert b["lr"] == pytest.approx(a["lr"], rel=1e-6), (a, b)
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        one, two = result(tmp_path, "acc"), result(tmp_path, "ddp")
        for k, v in one["params"].items():
            torch.testing.assert_close(two["params"][k], v, rtol=1e-5, atol=1e-6)


# every regularizer on: weight drop, locked dropouts, embedding dropout, AR/TAR, variable bptt
REGULARIZED = ("model.dropout=0.3", "model.dropouti=0.2", "model.dropouth=0.2",
               "model.dropoute=0.1", "model.wdrop=0.3", "train.variable_bptt=true")


def assert_resumed_equals_full(tmp: Path, full_dir: Path, part_dir: Path, last: int):
    full, part = result(tmp, "full"), result(tmp, "part")
    for k, v in full["params"].items():
        assert torch.equal(part["params"][k], v), k
    assert part["loader"] == full["loader"]
    fa = full_dir / "checkpoints" / f"step-{last:08d}"
    pa = part_dir / "checkpoints" / f"step-{last:08d}"
    opt = "optim.pt"
    if (fa / opt).is_file():
        fo, po = (torch.load(d / opt, weights_only=True) for d in (fa, pa))
        assert fo["state"].keys() == po["state"].keys()
        for i in fo["state"]:
            for k, v in fo["state"][i].items():
                assert torch.equal(po["state"][i][k], v) if torch.is_tensor(v) else po["state"][i][k] == v
    # the log continues exactly: same records (timings aside), each step once
    strip = [[{k: v for k, v in r.items() if k not in TIMING} for r in metrics(d)]
             for d in (full_dir, part_dir)]
    assert strip[0] == strip[1]
    finals = [r for r in metrics(part_dir) if r.get("final")]
    assert len(finals) == 1 and finals[0]["valid_loss"] == strip[0][-1]["valid_loss"]


@pytest.mark.parametrize("nproc,arch", [(1, "lstm"), (1, "qrnn"), (2, "lstm")])
def test_resume_after_sigkill_is_bit_exact(tmp_path, ptb_slice, nproc, arch):
    eng = "dist.engine=" + ("ddp" if nproc == 2 else "local")
    args = ("train.max_steps=10", "checkpoint.every_steps=2", "train.eval_every_steps=3",
            f"model.arch={arch}", *REGULARIZED, "optim.name=momentum", "optim.lr=0.3", eng)
    run(tmp_path, "full", nproc, ptb_slice, f"train.run_dir={tmp_path/'full'}", *args)
    rd = tmp_path / "part"
    kill = random.Random(f"{nproc}{arch}").randint(3, 9)
    p = run(tmp_path, "part", nproc, ptb_slice, f"train.run_dir={rd}", *args, kill=kill,
            check=False)
    assert p.returncode != 0  # killed with SIGKILL right after step `kill`
    ck = rd / "checkpoints"
    last = step_of(list_checkpoints(rd)[-1])  # every 2 steps, and at each new best validation
    assert kill - 2 < last <= kill and not (rd / "checkpoints" / f"step-{kill + 1:08d}").exists()
    # a checkpoint the kill cut short: no marker, garbage inside -- must be ignored
    (ck / "step-00000099").mkdir()
    (ck / "step-00000099" / "model.pt").write_bytes(b"garbage")
    run(tmp_path, "part", nproc, ptb_slice, f"train.run_dir={rd}", *args, "resume=auto")
    assert_resumed_equals_full(tmp_path, tmp_path / "full", rd, 10)


def test_deepspeed_resume_with_accumulation_and_its_adam_is_bit_exact(tmp_path, ptb_slice):
    args = ("dist.engine=deepspeed", "dist.zero_stage=1", "train.max_steps=6",
            "train.micro_batch=1", "optim.name=adam", "optim.lr=0.01",  # 2 ranks x 2 micro-steps
            "checkpoint.every_steps=2", *REGULARIZED)
    run(tmp_path, "full", 2, ptb_slice, f"train.run_dir={tmp_path/'full'}", *args)
    rd = tmp_path / "part"
    p = run(tmp_path, "part", 2, ptb_slice, f"train.run_dir={rd}", *args, kill=3, check=False)
    assert p.returncode != 0 and (rd / "checkpoints" / "step-00000002" / "deepspeed").is_dir()
    run(tmp_path, "part", 2, ptb_slice, f"train.run_dir={rd}", *args, "resume=auto")
    assert_resumed_equals_full(tmp_path, tmp_path / "full", rd, 6)


def test_resume_refuses_other_world_size(tmp_path, ptb_slice):
    rd = tmp_path / "two"
    run(tmp_path, "two", 2, ptb_slice, f"train.run_dir={rd}", "dist.engine=ddp",
        "train.max_steps=2")
    tr = make_trainer(tiny_config(rd, ptb_slice, **{"train.max_steps": 4}))
    with pytest.raises(UserError, match="written by 2 rank"):
        tr.fit(resume="auto")


def test_scaling_efficiency_needs_a_matching_recorded_baseline(tmp_path, ptb_slice):
    """Two ranks report efficiency only against a single-device baseline of the same model,
    vocabulary, micro-batch, bptt, dtype and device kind that a run recorded deliberately."""
    base = tmp_path / "baselines.json"
    env_over = {"DIST_LM_BASELINES": str(base)}
    old = {k: os.environ.get(k) for k in env_over}
    os.environ.update(env_over)
    try:
        p = run(tmp_path, "ddp0", 2, ptb_slice, f"train.run_dir={tmp_path/'ddp0'}",
                "dist.engine=ddp", "train.max_steps=3")
        assert not any("scaling_efficiency" in r for r in metrics(tmp_path / "ddp0"))
        # the baseline, recorded as rank 0's hint says: one device, the same config, the flags
        # the hint names (the 2-rank run's micro-batch of 2 streams; alone, one device picks 4)
        hint = next(ln for ln in p.stdout.splitlines() if "scaling efficiency left out" in ln)
        flags = re.findall(r"--(train\.\w+=[^\s,;]+)", hint.split(", or pass")[0])
        assert "train.record_baseline=true" in flags, hint
        run(tmp_path, "one", 1, ptb_slice, f"train.run_dir={tmp_path/'one'}", "train.max_steps=3",
            *flags)
        assert base.is_file()
        run(tmp_path, "ddp", 2, ptb_slice, f"train.run_dir={tmp_path/'ddp'}", "dist.engine=ddp",
            "train.max_steps=3")
        assert all("scaling_efficiency" in r for r in metrics(tmp_path / "ddp")
                   if "tokens_per_s" in r)
        run(tmp_path, "ddp2", 2, ptb_slice, f"train.run_dir={tmp_path/'ddp2'}", "dist.engine=ddp",
            "train.max_steps=3", "train.bptt=10")  # another bptt: no matching baseline
        assert not any("scaling_efficiency" in r for r in metrics(tmp_path / "ddp2"))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_time_budget_holds_across_sigkill_and_resume(tmp_path, ptb_slice):
    """train.max_seconds with the real clock: killed mid-run and resumed, the run's training
    time over both processes stops at the first step (or validation) that passes the budget, and
    elapsed_s continues."""
    rd = tmp_path / "run"
    args = (f"train.run_dir={rd}", "train.max_steps=0", "train.epochs=100000",
            "train.max_seconds=4", "checkpoint.every_steps=20")
    p = run(tmp_path, "part", 1, ptb_slice, *args, kill=50, check=False)
    assert p.returncode != 0
    st = torch.load(list_checkpoints(rd)[-1] / "trainer.pt", weights_only=True)
    assert st["trainer"]["step"] == 40 and 0 < st["trainer"]["elapsed"] < 4
    run(tmp_path, "part", 1, ptb_slice, *args, "resume=auto")
    rows = metrics(rd)
    steps = [(r["step"], r["elapsed_s"]) for r in rows if "loss" in r and "valid_loss" not in r]
    assert [s for s, _ in steps] == list(range(1, len(steps) + 1))  # each step once
    el = [e for _, e in steps]
    assert all(b > a for a, b in zip(el, el[1:]))  # continuous over the resume, no restart at 0
    # stopped by the budget at the first step boundary after it: the clock runs through
    # validations too, so the step that crossed 4 s may be a validation's (at an epoch end)
    timed = [(r["step"], r["elapsed_s"]) for r in rows if "elapsed_s" in r and not r.get("final")]
    over = [s for s, e in timed if e >= 4.0]
    assert el[-2] < 4.0 and over and over[0] == steps[-1][0]
    final = rows[-1]
    assert final["final"] and final["stop"] == "max_seconds" and final["train_seconds"] >= 4.0
