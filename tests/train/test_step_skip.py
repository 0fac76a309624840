"""Non-finite steps left out on the device (Trainer._device_step, the CUDA default) against the
host path (one agreement per step): the same parameters, optimizer state, checkpoints, metrics
and stop, and no host sync inside a step. DIST_LM_STEP_SKIP=device runs the device path on the
CPU (a fused torch optimizer in both runs); NaN losses are injected by forward call, so both
runs see them at the same windows whatever their step counters say in between.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from helpers.config import tiny_config
from helpers.runs import TIMING, make_trainer, metrics

from dist_lm.errors import UserError

# what reads a tensor on the host (on CUDA: waits for the device)
SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}


class HostReads(TorchFunctionMode):
    """Counts host reads of tensors made by the training step's own code (trainer, engine,
    optimizer, clipping). The model's are left out: on CPU its C kernels check their targets'
    range on the host (models/heads.py), a path CUDA does not take."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SYNCS:
            caller = sys._getframe(1).f_code.co_filename
            self.n += not any(f"dist_lm{os.sep}{d}{os.sep}" in caller
                              for d in ("models", "kernels"))
        return func(*args, **(kwargs or {}))


def train(run_dir, shards, monkeypatch, mode, nan_calls, **over):
    """One in-process run; returns (trainer, final record or the UserError, host reads inside
    each train_step)."""
    monkeypatch.setenv("DIST_LM_STEP_SKIP", "device")  # fused optimizer in both runs
    tr = make_trainer(tiny_config(run_dir, shards, **over))
    tr.step_skip = mode
    real, calls, reads = tr.engine.model, [0], []

    def model(inputs, hidden, targets):
        out = real(inputs, hidden, targets)
        calls[0] += 1
        if calls[0] in nan_calls:
            out = dataclasses.replace(out, nll=out.nll * float("nan"))
        return out

    inner = tr.train_step

    def step(inputs, targets):
        with HostReads() as hr:
            out = inner(inputs, targets)
        reads.append(hr.n)
        return out

    tr.engine.model, tr.train_step = model, step
    try:
        result = tr.fit()
    except UserError as exc:
        result = exc
    return tr, result, reads


def assert_same_state(a, b):
    for k, v in a.module.state_dict().items():
        assert torch.equal(b.module.state_dict()[k], v), k
    sa, sb = a.engine.optimizer.state_dict()["state"], b.engine.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k, v in sa[i].items():
            assert torch.equal(sb[i][k], v), (i, k)
    for k in ("step", "epoch_step", "tokens", "bad_steps", "bad_run"):
        assert getattr(a, k) == getattr(b, k), k


def records(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(run_dir)]


@pytest.mark.parametrize("optim", ["momentum", "adam"])
def test_device_skip_equals_host_skip_without_a_sync_per_step(tmp_path, ptb_slice, monkeypatch,
                                                              optim):
    over = {"optim.name": optim, "optim.lr": 0.3 if optim == "momentum" else 0.01,
            "train.max_steps": 14, "log.every_steps": 4, "checkpoint.every_steps": 5,
            "train.eval_every_steps": 6,
            "train.micro_batch": 2}  # 2 micro batches: the noise scale is measured (auto)
    # forward calls (2 per step attempt): attempts 1 (no optimizer state yet), 3 (alone), 8 and
    # 9 (two in a row)
    nan = {1, 5, 15, 17}
    host, hres, hreads = train(tmp_path / "host", ptb_slice, monkeypatch, "host", nan, **over)
    dev, dres, dreads = train(tmp_path / "dev", ptb_slice, monkeypatch, "device", nan, **over)
    assert hres["step"] == dres["step"] == 14 and host.bad_steps == 4
    assert_same_state(host, dev)
    assert records(tmp_path / "host") == records(tmp_path / "dev")  # b_noise too
    assert any("b_noise" in r for r in records(tmp_path / "dev"))
    assert sum(r.get("event") == "non-finite" for r in records(tmp_path / "dev")) == 4
    ck = [sorted(p.name for p in (d / "checkpoints").iterdir()) for d in (tmp_path / "host",
                                                                           tmp_path / "dev")]
    assert ck[0] == ck[1]
    assert len(hreads) == len(dreads) == 18
    assert all(n > 0 for n in hreads)  # the host path reads the agreement every step
    # the device path: none inside a step once the optimizer has state (the first two steps
    # were the host's: a left-out first step, then the one that creates the state)
    assert dreads[2:] == [0] * 16 and dreads[:2] != [0, 0], dreads


def test_device_skip_stops_after_too_many_in_a_row_like_the_host(tmp_path, ptb_slice,
                                                                 monkeypatch):
    over = {"optim.name": "momentum", "optim.lr": 0.3, "train.max_steps": 30,
            "log.every_steps": 8, "train.max_bad_steps": 2}
    # 3 in a row, then finite windows: the device run trips at the third and leaves out the
    # finite steps after it until it settles at the 8th
    nan = {3, 4, 5}
    host, hres, _ = train(tmp_path / "host", ptb_slice, monkeypatch, "host", nan, **over)
    dev, dres, _ = train(tmp_path / "dev", ptb_slice, monkeypatch, "device", nan, **over)
    for res in (hres, dres):
        assert isinstance(res, UserError)
        assert str(res).startswith("3 optimizer steps in a row") and "at step 3" in str(res)
    assert str(hres).replace(str(tmp_path / "host"), "RUN") == \
        str(dres).replace(str(tmp_path / "dev"), "RUN")  # the same last good checkpoint
    assert_same_state(host, dev)  # nothing after the third was applied either
    assert records(tmp_path / "host") == records(tmp_path / "dev")
