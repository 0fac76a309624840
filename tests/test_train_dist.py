"""1 rank vs 2 ranks (DDP) vs DeepSpeed ZeRO 0/1/2 on CPU/gloo, and exact resume after SIGKILL.

Runs go through tests/train_helpers.py (tiny tied LSTM, generated corpus) in subprocesses
launched with torchrun, one thread per process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_lm.errors import UserError

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "train_helpers.py"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp: Path, name: str, nproc: int, *args: str, kill: int = 0, check: bool = True):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO),
               DIST_LM_BASELINES=str(tmp / "baselines.json"))
    env.pop("DIST_LM_FAULT_KILL_AT_STEP", None)
    if kill:
        env["DIST_LM_FAULT_KILL_AT_STEP"] = str(kill)
    out = tmp / name
    if nproc == 1:
        cmd = [sys.executable, str(HELPER)]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port",
               str(_port()), str(HELPER)]
    cmd += [str(out)] + list(args)
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def result(tmp: Path, name: str, rank: int = 0) -> dict:
    return torch.load(tmp / f"{name}.rank{rank}.pt", weights_only=True)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "valid_loss" not in r]


STEPS = "train.max_steps=6"
SAME = ("train.variable_bptt=true", STEPS)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    run(tmp, "one", 1, f"train.run_dir={tmp/'one'}", *SAME)
    return tmp


def assert_same_curve(a: list[float], b: list[float]):
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)


def assert_ranks_identical(tmp, name):
    r0, r1 = result(tmp, name, 0), result(tmp, name, 1)
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    assert r0["lengths"] == r1["lengths"]  # random BPTT windows agree on every rank


def test_ddp_two_ranks_match_one(single, tmp_path):
    run(tmp_path, "ddp", 2, f"train.run_dir={tmp_path/'ddp'}", "dist.engine=ddp",
        "train.micro_batch=1", *SAME)  # 2 ranks x 2 accumulation steps x 1 stream
    assert_same_curve(losses(single / "one"), losses(tmp_path / "ddp"))
    assert_ranks_identical(tmp_path, "ddp")
    one, two = result(single, "one"), result(tmp_path, "ddp")
    assert one["lengths"] == two["lengths"]
    for k, v in one["params"].items():
        torch.testing.assert_close(two["params"][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_zero_matches(single, tmp_path, stage):
    run(tmp_path, "ds", 2, f"train.run_dir={tmp_path/'ds'}", "dist.engine=deepspeed",
        f"dist.zero_stage={stage}", *SAME)
    assert_same_curve(losses(single / "one"), losses(tmp_path / "ds"))
    assert_ranks_identical(tmp_path, "ds")
    assert (tmp_path / "ds" / "checkpoints" / "step-00000006" / "DONE").is_file()
    assert (tmp_path / "ds" / "checkpoints" / "step-00000006" / "model.pt").is_file()


RESUME = ("train.max_steps=10", "checkpoint.every_steps=2", "model.dropout=0.3",
          "model.dropouti=0.2", "train.variable_bptt=true", "optim.name=momentum", "optim.lr=0.3")


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_after_sigkill_is_bit_exact(tmp_path, nproc):
    eng = "dist.engine=" + ("ddp" if nproc == 2 else "local")
    run(tmp_path, "full", nproc, f"train.run_dir={tmp_path/'full'}", eng, *RESUME)
    rd = tmp_path / "part"
    p = run(tmp_path, "part", nproc, f"train.run_dir={rd}", eng, *RESUME, kill=5, check=False)
    assert p.returncode != 0  # killed with SIGKILL after step 5 (last complete checkpoint: 4)
    ck = rd / "checkpoints"
    assert (ck / "step-00000004" / "DONE").is_file()
    # a checkpoint the kill cut short: no marker, garbage inside -- must be ignored
    (ck / "step-00000006").mkdir()
    (ck / "step-00000006" / "model.pt").write_bytes(b"garbage")
    run(tmp_path, "part", nproc, f"train.run_dir={rd}", eng, *RESUME, "resume=auto")
    full, part = result(tmp_path, "full"), result(tmp_path, "part")
    for k, v in full["params"].items():
        assert torch.equal(part["params"][k], v), k
    kept = sorted(p.name for p in ck.iterdir())
    assert kept[-1] == "step-00000010" and len([k for k in kept]) <= 4  # keep_last 3 (+ best)


def test_deepspeed_resume_is_bit_exact(tmp_path):
    args = ("dist.engine=deepspeed", "dist.zero_stage=1", "train.max_steps=6",
            "checkpoint.every_steps=2", "model.dropout=0.3", "train.variable_bptt=true")
    run(tmp_path, "full", 2, f"train.run_dir={tmp_path/'full'}", *args)
    rd = tmp_path / "part"
    p = run(tmp_path, "part", 2, f"train.run_dir={rd}", *args, kill=3, check=False)
    assert p.returncode != 0 and (rd / "checkpoints" / "step-00000002" / "deepspeed").is_dir()
    run(tmp_path, "part", 2, f"train.run_dir={rd}", *args, "resume=auto")
    full, part = result(tmp_path, "full"), result(tmp_path, "part")
    for k, v in full["params"].items():
        assert torch.equal(part["params"][k], v), k


def test_resume_refuses_other_world_size(tmp_path):
    rd = tmp_path / "two"
    run(tmp_path, "two", 2, f"train.run_dir={rd}", "dist.engine=ddp", "train.max_steps=2")
    sys.path.insert(0, str(REPO / "tests"))
    from train_helpers import make_trainer, tiny_config

    tr = make_trainer(tiny_config(rd, **{"train.max_steps": 4}))
    with pytest.raises(UserError, match="written by 2 rank"):
        tr.fit(resume="auto")
    one = tmp_path / "one"
    make_trainer(tiny_config(one, **{"train.max_steps": 1})).fit()
    tr2 = make_trainer(tiny_config(tmp_path / "x", **{"train.global_batch": 2}))
    with pytest.raises(UserError, match="train.global_batch=4"):
        tr2.resume(str(one))
