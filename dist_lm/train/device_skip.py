"""Non-finite steps left out on the device: no host sync per optimizer step.

On CUDA (DIST_LM_STEP_SKIP=device forces it anywhere, =host turns it off) a non-finite step
is left out on the device: the finite check stays a device tensor, the fused optimizer skips
its update on it (GradScaler's found_inf), the carried hidden states and the interval sums
select on it. The host counts every step as applied and learns which were not at the next
settle (`settle`: one host sync, one collective on several ranks, which also agrees the clock
and the stop signal): every log interval, and before anything that reads the counters
(validation, checkpoint, stop, epoch end); it then replays the pending steps as the host path
would have counted and logged them. A run of more than train.max_bad_steps non-finite steps
trips a device flag that leaves every later step out too, so the run stops at the next settle
with the parameters of its last good step. The lr of the steps after a left-out one, until
the next settle, reads the step counter as if it had been applied (it only matters for warm-up
and cyclic schedules). Not used: for the first steps of a stateful optimizer
(engine.device_skip_ready), while NT-ASGD averages (the running mean's count is the host's),
for DeepSpeed, with train.max_bad_steps = -1.

The host path (agree.Agreement.step, Trainer._skip_step) agrees on every step instead.
"""

from __future__ import annotations

import torch

from .. import distributed as D


class DeviceSkip:
    """The device-side skip of one Trainer, whose counters it moves: the steps the host has not
    read yet, and the run of non-finite steps counted on the device."""

    def __init__(self, trainer):
        self.tr = trainer
        self.pending: list[tuple[torch.Tensor, int, float]] = []  # (skip flag, seq_len, lr)
        self._run: torch.Tensor | None = None
        self._tripped: torch.Tensor | None = None

    def active(self) -> bool:
        """Whether this step goes the device's way (trainer.step_skip: auto | device | host)."""
        tr = self.tr
        if tr.step_skip == "host" or (tr.step_skip != "device" and tr.device.type != "cuda"):
            return False
        return not tr.ntasgd.averaging and tr.engine.device_skip_ready()

    def step(self, lr: float, seq_len: int, gnorm: torch.Tensor, step_loss: torch.Tensor,
             hidden: list):
        """The optimizer step, left out on the device when non-finite (on any rank); counted as
        applied until the next settle. Returns what Trainer.train_step returns."""
        tr = self.tr
        bad = ~(torch.isfinite(gnorm) & torch.isfinite(step_loss))
        if tr.world > 1:  # every rank's loss: one small all-reduce on the device, no sync
            bad = D.all_reduce_max(bad.to(torch.float32)) > 0
        if self._run is None:  # the host's count is exact here (just settled)
            self._run = torch.full((), float(tr.bad_run), device=tr.device)
            self._tripped = torch.zeros((), dtype=torch.bool, device=tr.device)
        self._run = (self._run + 1) * bad
        self._tripped = self._tripped | (self._run > tr.cfg.train.max_bad_steps)
        skip = bad | self._tripped
        tr.engine.apply_unless(skip)
        if tr.noise:
            tr.noise.update(gnorm, skip=skip)  # a left-out step is not measured
        tr.hidden = select(skip, tr.hidden, hidden)
        tr.interval["loss"] = tr.interval["loss"] + torch.where(skip, 0.0, step_loss)
        self.pending.append((skip, seq_len, lr))
        tr.step += 1  # as if applied; settle takes back the left-out ones
        tr.epoch_step += 1
        tr.tokens += seq_len * tr.cfg.train.global_batch
        if tr.world == 1:  # the local clock and signal are the agreed ones
            tr.agree.tick(agree=False)
            tr.signalled = tr._signal
        return lr, seq_len, torch.where(skip, 0.0, gnorm)

    def must_settle(self) -> bool:
        """Whether the host must read the pending steps now: a full log interval, or the step
        counter (as if every pending step was applied) reaches a log, validation, checkpoint,
        fault-injection or stop point; it passes each such point before the exact counter
        does, so none is missed."""
        if not self.pending:
            return False
        tr = self.tr
        s, t, every = tr.step, tr.cfg.train, max(1, tr.cfg.log.every_steps)
        points = (every, t.eval_every_steps, tr.cfg.checkpoint.every_steps)
        return (len(self.pending) >= every or any(n and s % n == 0 for n in points)
                or tr.faults.kills_at(s) or tr.stop_reason() is not None)

    def settle(self) -> bool:
        """Read which pending steps were left out (one host sync) and bring the counters, the
        interval's step count and the non-finite log to what the host path leaves; on several
        ranks the clock and the stop signal are agreed in the same collective. Returns True when
        the latest step was left out (False when nothing was pending)."""
        if not self.pending:
            return False
        tr = self.tr
        pending, self.pending = self.pending, []
        self._run = self._tripped = None
        if tr.world > 1:
            tr.agree.tick(agree=False)
        head = torch.tensor([tr.elapsed, float(tr._signal)], dtype=torch.float64,
                            device=tr.device)
        buf = D.all_reduce_max(torch.cat([head, torch.stack([p[0] for p in pending]).double()]))
        vals = buf.tolist()
        if tr.world > 1:
            tr.elapsed, tr.signalled = vals[0], int(vals[1])
        B = tr.cfg.train.global_batch
        tr.step -= len(pending)
        tr.epoch_step -= len(pending)
        tr.tokens -= sum(p[1] for p in pending) * B
        for skipped, (_, seq_len, lr) in zip(vals[2:], pending):
            if not skipped:
                tr.bad_run = 0
                tr.step += 1
                tr.epoch_step += 1
                tr.tokens += seq_len * B
                continue
            tr.interval["n"] -= 1
            if tr.bad_run <= tr.cfg.train.max_bad_steps:  # else: left out after the trip
                tr._count_skip(lr, seq_len)
        return bool(vals[-1])


def select(skip: torch.Tensor, old, new):
    """`old` where the 0-dim bool `skip` is set, else `new`, tensor by tensor through nested
    hidden states (on the device: the hidden states a left-out step leaves as they were)."""
    if isinstance(new, torch.Tensor):
        return torch.where(skip, old.to(new.dtype), new)
    return type(new)(select(skip, o, n) for o, n in zip(old, new))
