"""`dist-lm bench gpu`: the --dry rehearsal runs every section through the real CLI (Triton
kernels under the interpreter, real Trainer runs, torchrun/DDP/DeepSpeed on CPU) with every
check passing; a failed check exits non-zero with the JSON still written; a run cut short
keeps the sections it finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_lm.bench import gpu
from dist_lm.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _env(tmp: Path, **extra) -> dict:
    env = dict(os.environ, TMPDIR=str(tmp), WANDB_MODE="disabled",
               DIST_LM_CACHE=str(tmp / "cache"), TRITON_CACHE_DIR=str(tmp / "triton"), **extra)
    for k in (gpu.TOL_ENV, gpu.SECTIONS_ENV, "TRITON_INTERPRET"):
        if k not in extra:
            env.pop(k, None)
    return env


def _bench(tmp: Path, out: Path, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_lm", "bench", "gpu", "--dry", "--json",
                           str(out)], env=_env(tmp, **extra), cwd=tmp, capture_output=True,
                          text=True, timeout=600)


def _rows(doc: dict, section: str) -> list[dict]:
    return [r for r in doc["results"] if r["section"] == section]


@pytest.mark.slow
def test_dry_run_passes_every_section_and_check(tmp_path):
    out = tmp_path / "dry.json"
    p = _bench(tmp_path, out)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["dry"] is True and doc["complete"] is True and doc["failed"] == []
    assert list(doc["sections"]) == list(gpu.SECTIONS)
    assert all(s["status"] == "done" for s in doc["sections"].values()), doc["sections"]
    for sec in gpu.SECTIONS:
        assert _rows(doc, sec), sec
    checks = [r for r in doc["results"] if "ok" in r]
    assert checks and all(r["ok"] is True for r in checks), [r for r in checks if not r["ok"]]

    names = {r["name"]: r for r in doc["results"]}
    assert names["C compiler builds against Python.h (Triton's launcher)"]["ok"]
    for key in ("torch", "Triton", "DeepSpeed", "NCCL", "cuDNN", "GPU", "GPU memory"):
        assert key in names, key
    # kernels: both ops, every dtype at every recipe-pattern shape, forward and all gradients
    kern = _rows(doc, "kernels")
    plan = gpu.Plan(dry=True)
    for op, grads in (("forget_mult", {"h", "df", "dx", "dh0"}),
                      ("qrnn_fused", {"h", "c", "dz", "df", "do", "dc0"})):
        for dt in ("fp32", "bf16", "fp16"):
            for T, b, H in plan.kernel_shapes:
                (row,) = [r for r in kern if r["name"] == f"{op} {dt} T={T} b={b} H={H}"]
                assert set(row["errors"]) == grads and row["ok"]
                assert row["tolerance"] == gpu.TOLERANCE[gpu.DTYPES[("fp32", "bf16",
                                                                     "fp16").index(dt)]]
    assert sum("zoneout" in r["name"] for r in kern) == 3
    assert sum("at both ends" in r["name"] for r in kern) == 2
    # timing rows: a time and a bandwidth against the copy for each kernel, fwd and bwd
    bw = [r for r in _rows(doc, "kernel_time") if r["unit"] == "GB/s"]
    assert len(bw) == 4 and all(r["baseline"] > 0 and r["ratio"] > 0 for r in bw)
    # real Trainer runs: three of them, each with a loss-down check, syncs/memory n/a on CPU
    train = _rows(doc, "train")
    assert sum("loss goes down" in r["name"] for r in train) == 3
    assert all(r["value"] == "n/a" for r in train if "host syncs" in r["name"]
               or "GPU memory" in r["name"])
    assert all(r["value"] > 0 for r in train if r["unit"] == "tokens/s")
    wt = [r for r in train if r["name"].startswith("WT-103") and "loss goes down" in r["name"]]
    assert len(wt) == 1 and len(wt[0]["losses"]) == plan.train_steps // plan.log_every
    # multi-rank: 2 ranks gloo, 1-rank DDP, DeepSpeed, each compared with the 1-rank curve
    dist = [r for r in _rows(doc, "dist") if "loss curve" in r["name"]]
    assert len(dist) == 3
    for r in dist:
        assert len(r["losses"]) == plan.dist_steps == len(r["reference"])
    total = [r for r in doc["results"] if r["section"] == "total"]
    assert len(total) == 1 and total[0]["unit"] == "s"


@pytest.mark.slow
def test_failed_check_exits_nonzero_with_the_json_written(tmp_path):
    """DIST_LM_BENCH_GPU_TOL_SCALE=0 makes every kernel tolerance 0: the interpreter's kernels
    never match fp64 exactly, so every kernel case fails; the sections after it still run and
    the JSON holds all of them."""
    out = tmp_path / "fail.json"
    p = _bench(tmp_path, out, **{gpu.TOL_ENV: "0", gpu.SECTIONS_ENV: "env,kernels,kernel_time"})
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert "check(s) failed" in p.stderr and "forget_mult fp32" in p.stderr
    doc = json.loads(out.read_text())
    assert doc["complete"] is True
    assert list(doc["sections"]) == ["env", "kernels", "kernel_time"]
    kern = _rows(doc, "kernels")
    assert kern and all(r["ok"] is False and r["tolerance"] == 0 for r in kern)
    assert set(doc["failed"]) == {r["name"] for r in kern}
    assert all(r.get("ok", True) for r in _rows(doc, "env"))
    assert len(_rows(doc, "kernel_time")) == 8


@pytest.mark.slow
def test_run_cut_short_keeps_the_finished_sections(tmp_path):
    """Killed during the kernel section (SIGKILL, as a device's time limit would), the JSON
    already holds the environment section, marked incomplete."""
    out = tmp_path / "cut.json"
    proc = subprocess.Popen([sys.executable, "-m", "dist_lm", "bench", "gpu", "--dry", "--json",
                             str(out)], env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not out.is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the bench and its interpreter child
        proc.wait()
    doc = json.loads(out.read_text())
    assert doc["complete"] is False
    assert list(doc["sections"]) == ["env"]
    assert {r["section"] for r in doc["results"]} == {"env"}
    assert not list(tmp_path.glob("*.tmp"))  # written under a temporary name, renamed whole


def test_without_a_gpu_the_full_run_is_refused_naming_dry():
    if gpu.torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="--dry"):
        gpu.gpu_command(None, dry=False)


def test_unknown_section_is_refused_before_anything_runs(monkeypatch, tmp_path):
    monkeypatch.setenv(gpu.SECTIONS_ENV, "env,kernelz")
    with pytest.raises(UserError, match="kernelz"):
        gpu.gpu_command(str(tmp_path / "x.json"), dry=True)
    assert not (tmp_path / "x.json").exists()


def test_kernel_check_fails_a_wrong_kernel_output(monkeypatch):
    """The verdict is not vacuous: the real CPU kernel passes at fp32, and the same check with
    one element of its backward output perturbed (by 1 % of the tensor's scale) fails."""
    args = ((6, 2, 20), gpu.torch.float32, "cpu", False, 1.0)
    assert gpu.check_fused(*args)["ok"]
    real = gpu._fused_run

    def one_wrong(*a, **k):
        h, c, dy, dc0 = real(*a, **k)
        dy = dy.clone()
        dy[-1, -1, -1] += 0.01 * float(dy.abs().max())
        return h, c, dy, dc0

    monkeypatch.setattr(gpu, "_fused_run", one_wrong)
    row = gpu.check_fused(*args)
    assert not row["ok"] and row["worst"] == "do"


def test_sync_counter_counts_the_window_of_steps_in_a_real_trainer_run(tmp_path, monkeypatch):
    """_SyncCounter's window on a real (CPU) Trainer run: CUDA's sync debug mode cannot run on
    this machine, so a stand-in for torch.cuda.set_sync_debug_mode records the mode and each
    step warns twice the way CUDA's does while it is "warn"; the counter must see exactly the
    steps start+1 .. start+n and leave the mode off."""
    import warnings

    from dist_lm.config import load_config
    from dist_lm.train.trainer import Trainer

    mode = {"now": 0, "history": []}

    def set_mode(m):
        mode["now"] = m
        mode["history"].append(m)

    monkeypatch.setattr(gpu.torch.cuda, "set_sync_debug_mode", set_mode)
    plan = gpu.Plan(dry=True)
    data = gpu.zipf_corpus(tmp_path / "data", 120, gpu._corpus_sizes(plan, 4, 12, 2))
    cfg = load_config(str(gpu.CONFIGS / "ptb_awd_lstm.toml"),
                      gpu._common(plan, tmp_path / "run", data, 6, 3))
    tr = Trainer(cfg)
    inner = tr.train_step
    seen = []

    def step(inputs, targets):
        if mode["now"] == "warn":
            seen.append(tr.step + 1)
            for _ in range(2):
                warnings.warn("called a synchronizing CUDA operation")
        return inner(inputs, targets)

    tr.train_step = step
    counter = gpu._SyncCounter(tr, 1, 3)
    tr.fit()
    assert seen == [2, 3, 4]
    assert counter.per_step() == 2.0
    assert mode["history"] == ["warn", 0]
