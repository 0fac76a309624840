"""The sweep's lockstep with a trial it runs (dist_lm/sweep/study.py, TrialRunner): with
LOCKSTEP_ENV set, rank 0 of the trial waits after each validation record for a line on its
stdin, which the sweep writes once its pruner has seen the record. A pruned trial then stops at
that validation whatever the machine's speed. Its own module, beside the Trainer: the trainer
must not import the sweep package (Optuna, matplotlib), which the GPU machine's kit leaves out.
"""

from __future__ import annotations

import os
import sys

LOCKSTEP_ENV = "DIST_LM_SWEEP_LOCKSTEP"


def await_sweep(rank: int) -> None:
    """Block rank 0 until the sweep has read the validation just logged (EOF: the sweep stopped
    the trial; its SIGTERM ends the run)."""
    if rank == 0 and os.environ.get(LOCKSTEP_ENV):
        sys.stdin.readline()
