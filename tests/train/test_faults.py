"""The fault suite (`pytest -m faults`): every fault injected into a real run (the dist-lm CLI or
torchrun on the real model, StreamLoader and shards), and what must survive it.

Faults: SIGTERM on 1 and 2 ranks (preemption), one rank SIGKILLed under torchrun's elastic
restarts, a NaN loss on one step and on one rank, consecutive NaN steps, a flipped byte in the
newest checkpoint, a failed checkpoint write (file size limit set from outside with prlimit).
Where resume is claimed, the parameters (and optimizer state) end bit-identical to an
uninterrupted run; no complete checkpoint is ever lost.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.cli import BIN, DIST_LM, REPO, cli_env, run_ok, torchrun
from helpers.config import FAULT_TOML, tiny_config
from helpers.runs import make_trainer, metrics, wait_for
from helpers.runs import one_thread  # noqa: F401  (autouse: tiny models, one thread)

from dist_lm.errors import UserError
from dist_lm.run.layout import damage, find_checkpoint, list_checkpoints, step_of

pytestmark = [pytest.mark.faults, pytest.mark.slow]

def train_cmd(tmp: Path, shards: Path, run_dir: Path, *args: str, nproc: int = 1) -> list[str]:
    cfg = tmp / "fault.toml"
    cfg.write_text(FAULT_TOML)
    head = DIST_LM if nproc == 1 else [*torchrun(nproc), "-m", "dist_lm"]
    eng = [] if nproc == 1 else ["--dist.engine=ddp"]
    return head + ["train", str(cfg), f"--data.shards={shards}", f"--train.run_dir={run_dir}",
                   *eng, *args]


def last_state(run_dir: Path) -> tuple[Path, dict, dict]:
    ck = list_checkpoints(run_dir)[-1]
    opt = torch.load(ck / "optim.pt", weights_only=True) if (ck / "optim.pt").is_file() else {}
    return ck, torch.load(ck / "model.pt", weights_only=True), opt


def assert_same_end(a: Path, b: Path):
    """Two runs end in the same step with bit-identical parameters and optimizer state."""
    (ca, ma, oa), (cb, mb, ob) = last_state(a), last_state(b)
    assert ca.name == cb.name
    for k, v in ma.items():
        assert torch.equal(mb[k], v), k
    for i, st in oa.get("state", {}).items():
        for k, v in st.items():
            assert torch.equal(ob["state"][i][k], v), (i, k)


def logged_step(run_dir: Path) -> int:
    try:
        return max((r.get("step", 0) for r in metrics(run_dir)), default=0)
    except (OSError, ValueError):
        return 0


def no_incomplete(run_dir: Path):
    """Every step directory is complete and whole: nothing half-written is left."""
    for p in (run_dir / "checkpoints").iterdir():
        assert (p / "DONE").is_file(), p
        assert damage(p) is None, p


# ---- 1. preemption -------------------------------------------------------------------------

@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_checkpoints_the_agreed_step_and_resumes_bit_exact(tmp_path, ptb_slice, nproc):
    steps = ("--train.max_steps=400", "--checkpoint.every_steps=100")
    run_ok(train_cmd(tmp_path, ptb_slice, tmp_path / "full", *steps, nproc=nproc))
    rd = tmp_path / "part"
    proc = subprocess.Popen(train_cmd(tmp_path, ptb_slice, rd, *steps, nproc=nproc), cwd=REPO,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: logged_step(rd) >= 30, proc=proc)
    proc.send_signal(signal.SIGTERM)  # the cluster's preemption (torchrun forwards it)
    out, err = proc.communicate(timeout=120)
    if nproc == 1:
        assert proc.returncode == 75, err  # "stopped, resumable"
    else:
        assert proc.returncode != 0
    assert "stopped by SIGTERM at step" in err and "--resume auto" in err, err
    ck = list_checkpoints(rd)[-1]
    stopped = step_of(ck)
    assert 30 <= stopped < 400 and stopped % 100 != 0  # the step of the signal, not a periodic one
    assert sorted(p.name for p in ck.glob("rank-*.pt")) == [f"rank-{r:05d}.pt" for r in range(nproc)]
    no_incomplete(rd)
    run_ok(train_cmd(tmp_path, ptb_slice, rd, *steps, "--resume=auto", nproc=nproc))
    assert_same_end(tmp_path / "full", rd)
    rows = [r["step"] for r in metrics(rd) if "loss" in r and "valid_loss" not in r]
    assert rows == list(range(1, 401))  # the log continues: every step once


# ---- 2. elastic restart --------------------------------------------------------------------

def test_torchrun_restarts_after_a_rank_dies_and_ends_bit_exact(tmp_path, ptb_slice):
    """launch/torchrun.sh (--max-restarts, --resume auto by default): rank 1 is SIGKILLed after
    step 7; torchrun restarts both ranks, which continue from step 6."""
    toml = tmp_path / "fault.toml"
    toml.write_text(FAULT_TOML)
    args = [str(toml), f"--data.shards={ptb_slice}", "--train.max_steps=12",
            "--checkpoint.every_steps=2"]
    # gloo on the loopback interface: its address lookup by host name timed out once under load
    launcher = dict(NPROC=2, TORCHRUN=BIN / "torchrun", MAX_RESTARTS=1, GLOO_SOCKET_IFNAME="lo")

    def launch(rd, **faults):
        cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), *args, f"--train.run_dir={rd}"]
        return subprocess.run(cmd, cwd=REPO, env=cli_env(**launcher, **faults), capture_output=True,
                              text=True, timeout=300)

    p = launch(tmp_path / "full")
    assert p.returncode == 0, p.stderr[-3000:]
    p = launch(tmp_path / "part", DIST_LM_FAULT_KILL_AT_STEP=7, DIST_LM_FAULT_RANK=1)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr  # the restart continued, not restarted
    assert_same_end(tmp_path / "full", tmp_path / "part")
    no_incomplete(tmp_path / "part")


# ---- 3. non-finite steps -------------------------------------------------------------------

def test_nonfinite_step_is_not_applied(tmp_path, ptb_slice, monkeypatch):
    monkeypatch.setenv("DIST_LM_FAULT_NAN_AT_STEPS", "5")
    tr = make_trainer(tiny_config(tmp_path, ptb_slice, **{"train.max_steps": 8,
                                                          "optim.name": "momentum"}))
    seen, inner = [], tr.train_step

    def snapshot():
        opt = tr.engine.optimizer.state_dict()["state"]
        return ({k: v.clone() for k, v in tr.module.state_dict().items()},
                {i: {k: v.clone() for k, v in st.items()} for i, st in opt.items()}, tr.step)

    def spy(inputs, targets):
        before = snapshot()
        out = inner(inputs, targets)
        seen.append((before, snapshot(), out[2] is None))
        return out

    tr.train_step = spy
    final = tr.fit()
    skipped = [(b, a) for b, a, was_skipped in seen if was_skipped]
    assert len(skipped) == 1 and final["step"] == 8 and len(seen) == 9
    (pb, ob, sb), (pa, oa, sa) = skipped[0]
    assert sb == sa == 4  # the step counter did not move
    for k in pb:
        assert torch.equal(pb[k], pa[k]), k  # parameters untouched
    for i in ob:
        for k in ob[i]:
            assert torch.equal(ob[i][k], oa[i][k]), (i, k)  # momentum buffers untouched
    events = [r for r in metrics(tmp_path) if r.get("event") == "non-finite"]
    assert len(events) == 1 and events[0]["step"] == 4 and events[0]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in tr.module.state_dict().values()
               if v.is_floating_point())


@pytest.mark.parametrize("skip", ["host", "device"])  # device: CUDA's way, no sync per step
def test_nonfinite_on_one_rank_is_skipped_by_every_rank(tmp_path, ptb_slice, skip):
    rd = tmp_path / "ddp"
    run_ok(train_cmd(tmp_path, ptb_slice, rd, "--train.max_steps=6", "--train.global_batch=4",
                     "--log.every_steps=4", nproc=2),
           DIST_LM_FAULT_NAN_AT_STEPS=3, DIST_LM_FAULT_RANK=1, DIST_LM_STEP_SKIP=skip)
    events = [r for r in metrics(rd) if r.get("event") == "non-finite"]
    assert len(events) == 1 and events[0]["step"] == 2  # rank 0's loss was finite: it skipped too
    ck, model, _ = last_state(rd)
    assert step_of(ck) == 6 and all(torch.isfinite(v).all() for v in model.values()
                                    if v.is_floating_point())


def test_consecutive_nonfinite_steps_stop_naming_the_last_good_checkpoint(tmp_path, ptb_slice):
    rd = tmp_path / "run"
    p = subprocess.run(train_cmd(tmp_path, ptb_slice, rd, "--train.max_steps=20",
                                 "--checkpoint.every_steps=2", "--train.max_bad_steps=2"),
                       cwd=REPO, env=cli_env(DIST_LM_FAULT_NAN_AT_STEPS="5,5,5,5"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("dist-lm: error: 3 optimizer steps in a row"), last
    assert "step 5" in last and "step-00000004" in last and "--resume auto" in last
    no_incomplete(rd)


# ---- 4. corrupted checkpoints --------------------------------------------------------------

def test_flipped_byte_in_newest_checkpoint_is_skipped_by_resume_and_eval(tmp_path, ptb_slice):
    run_ok(train_cmd(tmp_path, ptb_slice, tmp_path / "full", "--train.max_steps=8",
                     "--checkpoint.every_steps=2"))
    rd = tmp_path / "part"
    run_ok(train_cmd(tmp_path, ptb_slice, rd, "--train.max_steps=6", "--checkpoint.every_steps=2"))
    newest = rd / "checkpoints" / "step-00000006" / "model.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x10
    newest.write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged: model.pt does not match its sha256"):
        find_checkpoint(newest.parent)  # asked for by name: an error, not a silent fallback
    p = run_ok([sys.executable, "-m", "dist_lm", "eval", str(rd), "--checkpoint", "latest"])
    assert "skipping checkpoint" in p.stderr and "step-00000006: model.pt" in p.stderr
    assert p.stderr.count("skipping checkpoint") == 1, p.stderr  # one warning, not one per look
    assert (rd / "checkpoints" / "step-00000004" / "eval-test.json").is_file()
    p = run_ok(train_cmd(tmp_path, ptb_slice, rd, "--train.max_steps=8",
                         "--checkpoint.every_steps=2", "--resume=auto"))
    assert "resumed from" in p.stdout and "step-00000004" in p.stdout
    assert_same_end(tmp_path / "full", rd)


# ---- 5. a failed checkpoint write ----------------------------------------------------------

def test_failed_checkpoint_write_keeps_the_previous_one_and_says_so(tmp_path, ptb_slice):
    steps = ("--train.max_steps=600", "--checkpoint.every_steps=200", "--log.every_steps=100")
    rd = tmp_path / "part"
    proc = subprocess.Popen(train_cmd(tmp_path, ptb_slice, rd, *steps), cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (rd / "checkpoints" / "step-00000200" / "DONE").is_file(), proc=proc)
    # the disk fills up: no file may grow past 16 KB any more (model.pt is larger)
    subprocess.run(["prlimit", f"--pid={proc.pid}", "--fsize=16384"], check=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dist-lm: error: cannot write checkpoint"), last
    assert "File too large" in last and "step-00000200, which is intact" in last
    kept = sorted(step_of(p) for p in (rd / "checkpoints").iterdir())
    assert kept[-1] == 200  # the failed step-00000400 left nothing; best-validation steps below
    assert step_of(list_checkpoints(rd)[-1]) == 200
    no_incomplete(rd)
    run_ok(train_cmd(tmp_path, ptb_slice, tmp_path / "full", *steps))
    run_ok(train_cmd(tmp_path, ptb_slice, rd, *steps, "--resume=auto"))
    assert_same_end(tmp_path / "full", rd)


# ---- 6. a search SIGKILLed mid-way ---------------------------------------------------------

SEARCH = ("--search.n_nodes=4", "--search.rounds=2", "--search.shared_steps=3",
          "--search.controller_steps=2", "--search.controller_hidden=12",
          "--search.derive_samples=3", "--search.derive_windows=2", "--model.n_layers=1",
          "--train.variable_bptt=true", "--checkpoint.every_steps=3")


def search_cmd(tmp: Path, shards: Path, run_dir: Path, *args: str) -> list[str]:
    cfg = tmp / "fault.toml"
    cfg.write_text(FAULT_TOML)
    return [*DIST_LM, "search", str(cfg), f"--data.shards={shards}",
            f"--train.run_dir={run_dir}", *SEARCH, *args]


def assert_equal_states(a, b, where=""):
    """Nested checkpoint states (dicts, lists, tensors, numbers) equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal_states(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_states(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def test_search_sigkilled_resumes_bit_exact(tmp_path, ptb_slice):
    """A search SIGKILLed after step 7 (the fault injection of `train`) leaves only complete,
    whole step directories; `--resume auto` continues from step 6 and ends with the supernet,
    its optimizer, the controller, its optimizer, the baseline, the loaders, hidden states and
    generators, and the derived cell of an uninterrupted search."""
    run_ok(search_cmd(tmp_path, ptb_slice, tmp_path / "full"))
    rd = tmp_path / "part"
    p = subprocess.run(search_cmd(tmp_path, ptb_slice, rd), cwd=REPO,
                       env=cli_env(DIST_LM_FAULT_KILL_AT_STEP=7), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert [step_of(c) for c in list_checkpoints(rd)] == [3, 6]
    no_incomplete(rd)
    assert not (rd / "derive.json").exists()
    p = run_ok(search_cmd(tmp_path, ptb_slice, rd, "--resume=auto"))
    assert "resumed from" in p.stdout and "step-00000006" in p.stdout
    assert_same_end(tmp_path / "full", rd)  # the supernet and its optimizer
    (ca, *_), (cb, *_) = last_state(tmp_path / "full"), last_state(rd)
    assert ca.name == cb.name == "step-00000010"
    for name in ("trainer.pt", "rank-00000.pt"):
        a, b = (torch.load(c / name, weights_only=True) for c in (ca, cb))
        if name == "trainer.pt":  # the elapsed seconds are the runs' own
            assert a["search"].pop("elapsed") > 0 and b["search"].pop("elapsed") > 0
            assert a["search"]["baseline"] is not None
        assert_equal_states(a, b, name)
    derived = [json.loads((d / "derive.json").read_text()) for d in (tmp_path / "full", rd)]
    assert derived[0]["cell"] == derived[1]["cell"]
    assert derived[0]["samples"] == derived[1]["samples"]
