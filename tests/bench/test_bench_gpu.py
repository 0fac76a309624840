"""`dist-lm bench gpu` and launch/gpu_check.sh: the CPU rehearsal runs every part through the
real script and CLI (Triton kernels under the interpreter, real Trainer runs, `dist-lm train`,
DDP and DeepSpeed on CPU), writing the JSON and the table; a case that kills its process, one
that raises and one that hangs each lose only themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_lm.bench import gpu
from dist_lm.bench.gpu import common, kernels, runner, sync
from dist_lm.errors import UserError
from helpers.cli import REPO



def _env(tmp: Path, **extra) -> dict:
    env = dict(os.environ, TMPDIR=str(tmp), WANDB_MODE="disabled",
               DIST_LM_CACHE=str(tmp / "cache"), TRITON_CACHE_DIR=str(tmp / "triton"),
               DIST_LM_GPU_KIT=str(tmp / "no-kit"), **extra)
    for k in (gpu.TOL_ENV, gpu.SECTIONS_ENV, gpu.FAULT_ENV, "TRITON_INTERPRET"):
        if k not in extra:
            env.pop(k, None)
    return env


def _rows(doc: dict, part: str) -> list[dict]:
    return [r for r in doc["results"] if r["part"] == part]


@pytest.mark.slow
def test_rehearsal_runs_every_part_and_a_crashed_case_loses_only_itself(tmp_path):
    """bash launch/gpu_check.sh OUT with DRY=1: every part runs at tiny sizes on CPU. One kernel
    case is made to kill its process (os._exit): it is the only failed check, the part's other
    cases run in a fresh process, and every other part's checks pass."""
    out = tmp_path / "out"
    bad = "forget_mult fp32 T=3 b=3 H=20"
    p = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), str(out)],
                       env=_env(tmp_path, DRY="1", PYTHON=sys.executable,
                                KIT=str(tmp_path / "no-kit"),
                                **{gpu.FAULT_ENV: f"kernels:{bad}:exit"}),
                       cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert p.returncode == 2, p.stdout[-4000:] + p.stderr[-4000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    table = (out / "gpu_check.txt").read_text()
    assert "torch" in (out / "gpu_check.log").read_text()
    assert doc["dry"] is True and doc["complete"] is True
    assert list(doc["parts"]) == [*runner.NAMES, "total"]
    assert doc["failed"] == [f"kernels/{bad}: ran to its end"], doc["failed"]
    assert doc["parts"]["kernels"]["status"] == "restarted"
    assert all(doc["parts"][p]["status"] == "done" for p in runner.NAMES if p != "kernels")
    for part in runner.NAMES:
        assert _rows(doc, part), part
        assert f"== {part}: " in table
    checks = [r for r in doc["results"] if "ok" in r and r["name"] not in doc["failed"]]
    assert checks and all(r["ok"] is True for r in checks), [r for r in checks if not r["ok"]]

    names = {r["name"]: r for r in doc["results"]}
    for key in ("torch", "triton", "deepspeed", "NCCL", "import fire", "import deepspeed",
                "GPU", "C compiler builds against Python.h (Triton's launcher)"):
        assert key in names, key
    # kernels: both ops, every dtype at every shape (forward and all gradients) but the one
    # killed case, whose process died; the zoneout and the large cases
    kern = _rows(doc, "kernels")
    plan = common.Plan(dry=True)
    for op, grads in (("forget_mult", {"h", "df", "dx", "dh0"}),
                      ("qrnn_fused", {"h", "c", "dz", "df", "do", "dc0"})):
        for dt in ("fp32", "bf16", "fp16"):
            for T, b, H in plan.kernel_shapes:
                name = f"{op} {dt} T={T} b={b} H={H}"
                if name == bad:
                    continue
                (row,) = [r for r in kern if r["name"] == name]
                assert set(row["errors"]) == grads and row["ok"]
    assert sum("zoneout" in r["name"] for r in kern) == 3
    assert sum("at both ends" in r["name"] for r in kern) == 2
    # speed: each kernel against the copy, each op against its unfused path
    speed = _rows(doc, "kernel_speed")
    assert sum(r["unit"] == "GB/s" and r["baseline"] > 0 for r in speed) == 4
    assert sum("vs unfused path" in r["name"] and r["ratio"] > 0 for r in speed) == 2
    # model step: 1x, 4x, 16x and the largest batch, for both recipes
    step = _rows(doc, "model_step")
    assert sum("tokens/s at" in r["name"] for r in step) == 6
    assert sum("largest global batch" in r["name"] and r["value"] >= 16 * 4 for r in step) == 2
    # train: a real time-bounded `dist-lm train` of each recipe, loss going down
    train = _rows(doc, "train")
    assert sum("loss goes down" in r["name"] for r in train) == 2
    assert any("14-epoch recipe" in r["name"] and r["value"] > 0 for r in train)
    # sync: n/a on CPU; engines: DeepSpeed ZeRO-1, 2 ranks, curves against 1 rank
    assert all(r["value"] == "n/a" for r in _rows(doc, "sync") if "host syncs" in r["name"])
    curves = [r for r in _rows(doc, "engines") if "loss curve" in r["name"]]
    assert [r["name"].split(":")[0] for r in curves] == [  # on CPU one process per code path
        "1-rank DeepSpeed ZeRO-1 bf16", "2 ranks on one CPU, DDP over gloo"]
    assert all(len(r["losses"]) == plan.dist_steps == len(r["reference"]) for r in curves)


def _drive(tmp_path, part: str, bound: float, fault: str, monkeypatch):
    monkeypatch.setenv(gpu.FAULT_ENV, fault)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    log = open(tmp_path / "log", "w")
    try:
        return runner.drive_part(part, {"tmp": str(tmp_path), "dry": True}, bound, log)
    finally:
        log.close()


def test_a_case_that_raises_is_one_failed_row_and_the_next_case_runs(tmp_path, monkeypatch):
    rows, status = _drive(tmp_path, "env", 300, "env:versions:raise", monkeypatch)
    assert status == "done"
    failed = [r for r in rows if r.get("ok") is False]
    assert [r["name"] for r in failed] == ["env/versions: ran to its end"]
    assert "fault injected" in failed[0]["error"]
    assert {r["case"] for r in rows} == {"versions", "machine"}
    assert any(r["name"] == "CPUs" for r in rows)


def test_a_hanging_case_is_timed_out_and_the_rest_is_listed_not_run(tmp_path, monkeypatch):
    rows, status = _drive(tmp_path, "env", 20, "env:versions:hang", monkeypatch)
    assert status == "timed out"
    assert [(r["name"], r["value"]) for r in rows] == [
        ("env/versions: ran to its end", "lost"), ("env/machine: not run (timed out)",
                                                   "not run")]
    assert "timed out" in rows[0]["error"]


def test_without_a_gpu_the_full_run_is_refused_naming_dry():
    if common.torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="--dry"):
        gpu.gpu_command(None, dry=False)


def test_unknown_part_is_refused_before_anything_runs(monkeypatch, tmp_path):
    monkeypatch.setenv(gpu.SECTIONS_ENV, "env,kernelz")
    with pytest.raises(UserError, match="kernelz"):
        gpu.gpu_command(str(tmp_path / "x.json"), dry=True)
    assert not (tmp_path / "x.json").exists()


def test_kernel_check_fails_a_wrong_kernel_output(monkeypatch):
    """The verdict is not vacuous: the real CPU kernel passes at fp32, and the same check with
    one element of its backward output perturbed (by 1 % of the tensor's scale) fails."""
    args = ((6, 2, 20), common.torch.float32, "cpu", False, 1.0)
    assert kernels.check_fused(*args)["ok"]
    real = kernels._fused_run

    def one_wrong(*a, **k):
        h, c, dy, dc0 = real(*a, **k)
        dy = dy.clone()
        dy[-1, -1, -1] += 0.01 * float(dy.abs().max())
        return h, c, dy, dc0

    monkeypatch.setattr(kernels, "_fused_run", one_wrong)
    row = kernels.check_fused(*args)
    assert not row["ok"] and row["worst"] == "do"


def test_sync_counter_counts_and_names_the_window_of_steps(tmp_path, monkeypatch):
    """SyncCounter's window on a real (CPU) Trainer run: CUDA's sync debug mode cannot run on
    this machine, so a stand-in for torch.cuda.set_sync_debug_mode records the mode and each
    step warns twice from one line the way CUDA's does while it is "warn"; the counter must see
    exactly the steps start+1 .. start+n, name that line, and leave the mode off."""
    import warnings

    from dist_lm.config import load_config
    from dist_lm.train.trainer import Trainer

    mode = {"now": 0, "history": []}

    def set_mode(m):
        mode["now"] = m
        mode["history"].append(m)

    monkeypatch.setattr(sync.torch.cuda, "set_sync_debug_mode", set_mode)
    plan = common.Plan(dry=True)
    data = common.zipf_corpus(tmp_path / "data", 120, common.corpus_sizes(plan, 4, 12, 2, 6))
    cfg = load_config(common.PTB_CONFIG,
                      common.common_overrides(plan, tmp_path / "run", data, 6, 3))
    tr = Trainer(cfg)
    inner = tr.train_step
    seen = []

    def step(inputs, targets):
        if mode["now"] == "warn":
            seen.append(tr.step + 1)
            for _ in range(2):
                warnings.warn("called a synchronizing CUDA operation")  # the named line
        return inner(inputs, targets)

    tr.train_step = step
    counter = sync.SyncCounter(tr, 1, 3)
    tr.fit()
    assert seen == [2, 3, 4]
    assert counter.per_step() == 2.0
    assert mode["history"] == ["warn", 0]
    ((where, k),) = counter.where.items()
    assert k == 6 and where.startswith("test_bench_gpu.py:") and "# the named line" in where


def test_loss_down_judges_the_late_quarter_not_one_noisy_interval():
    """A healthy run whose very last interval is noisy passes; a diverged, stuck or rising run
    fails (the rehearsal's time-bounded runs end at any interval: CI once failed on one)."""
    rng = torch.Generator().manual_seed(0)
    healthy = (5.3 - torch.linspace(0, 0.8, 40) + 0.3 * torch.randn(40, generator=rng)).tolist()
    healthy[-1] = healthy[0] + 0.5  # the last interval alone says "went up"
    assert common.loss_down("x", healthy)["ok"]
    assert not common.loss_down("x", healthy[:-1] + [float("nan")])["ok"]
    assert not common.loss_down("x", [5.3] + [5.31] * 39)["ok"]  # stuck
    assert not common.loss_down("x", (5.3 + torch.linspace(0, 0.8, 40)).tolist())["ok"]
    assert not common.loss_down("x", [5.3])["ok"]
