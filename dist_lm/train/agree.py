"""What every rank must agree on before it decides: the run's clock (the slowest rank's), a
stop signal (any rank's) and whether a step is non-finite (on any rank), so that every rank
takes the same lr, skip, checkpoint and stop decisions. On CUDA the device-side skip
(device_skip.DeviceSkip) agrees at its settle instead of at every step."""

from __future__ import annotations

import torch

from .. import distributed as D


class Agreement:
    """The agreement of one Trainer (`tr`), whose `elapsed` and `signalled` it sets."""

    def __init__(self, trainer):
        self.tr = trainer
        self.elapsed0, self.t0 = 0.0, 0.0

    def start(self) -> None:
        """The clock runs from here, continuing the run's trained seconds (a resume's too)."""
        self.elapsed0, self.t0 = self.tr.elapsed, self.tr.clock()

    def tick(self, agree: bool = True) -> None:
        """Advance tr.elapsed to now; on several ranks to the slowest rank's clock (a
        collective), so every rank's stop and checkpoint decisions stay the same."""
        tr = self.tr
        tr.elapsed = self.elapsed0 + (tr.clock() - self.t0)
        if agree and tr.world > 1:
            buf = torch.tensor([tr.elapsed], dtype=torch.float64, device=tr.device)
            tr.elapsed = float(D.all_reduce_max(buf)[0])

    def step(self, bad: torch.Tensor | None) -> bool:
        """Once per step, before the optimizer step: the clock, a stop signal and whether the
        step is non-finite, agreed over ranks (the slowest clock, any rank's signal or bad
        step). Returns True when the step must be left out. Note: a CPU-GPU sync point (skipped
        entirely when nothing needs it: one rank, max_bad_steps = -1); on CUDA the device-side
        skip replaces it (device_skip.DeviceSkip, settled every log interval)."""
        tr = self.tr
        self.tick(agree=False)  # agreed below, with the rest
        if tr.world == 1 and bad is None:
            tr.signalled = tr._signal
            return False
        buf = torch.stack([torch.tensor(tr.elapsed, dtype=torch.float64, device=tr.device),
                           torch.tensor(float(tr._signal), dtype=torch.float64,
                                        device=tr.device),
                           (bad if bad is not None else torch.zeros((), device=tr.device))
                           .to(torch.float64)])
        elapsed, sig, skip = D.all_reduce_max(buf).tolist()
        tr.elapsed, tr.signalled = elapsed, int(sig)
        return skip > 0
