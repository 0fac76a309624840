"""Fault injection for the fault tests (tests/train/test_faults.py): one hook object the Trainer
asks at two points, built once at the start; nothing in the training loop reads the environment.

In-process tests pass `Trainer(cfg, faults=Faults(nan_at=[5]))`; runs launched through the CLI
(torchrun, the kill-and-resume tests) set the environment instead, read by `Faults.from_env`:

    DIST_LM_FAULT_KILL_AT_STEP   SIGKILL this process right after this optimizer step
    DIST_LM_FAULT_NAN_AT_STEPS   a NaN loss at these steps (1-based, comma-separated; a step
                                 listed k times fails its first k attempts)
    DIST_LM_FAULT_RANK           only on this rank (every rank when unset)

Faults fire only in torchrun's first attempt, not after its restart.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

KILL_ENV = "DIST_LM_FAULT_KILL_AT_STEP"
NAN_ENV = "DIST_LM_FAULT_NAN_AT_STEPS"
FAULT_RANK_ENV = "DIST_LM_FAULT_RANK"


@dataclass
class Faults:
    kill_at: int = 0  # 0: never
    nan_at: list[int] = field(default_factory=list)

    @classmethod
    def from_env(cls, rank: int) -> "Faults":
        env = os.environ
        if (env.get(FAULT_RANK_ENV, str(rank)) != str(rank)
                or env.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"):
            return cls()  # another rank's fault, or torchrun's restart
        return cls(int(env.get(KILL_ENV, "0")),
                   [int(x) for x in env.get(NAN_ENV, "").split(",") if x.strip()])

    def nan_loss(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) gets a NaN loss; each listed occurrence
        fires once."""
        if step not in self.nan_at:
            return False
        self.nan_at.remove(step)
        return True

    def kills_at(self, step: int) -> bool:
        return bool(self.kill_at) and step == self.kill_at

    def after_step(self, step: int) -> None:
        """The end of optimizer step `step` (counted): SIGKILL here when asked."""
        if self.kills_at(step):
            os.kill(os.getpid(), signal.SIGKILL)
