"""The Trainer's side of its run directory (dist_lm.run owns the directory itself): the pieces
its checkpoints hold (the carried hidden states among them, as a Stateful piece of the rank
file), opening the run (fresh, resumed or refused) with this run's checks, and the "resolved"
block of config.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import distributed as D
from ..config import RESOLVED
from ..errors import UserError
from ..fileio import write_text_atomic
from ..run.checkpointer import Checkpointer, RNGState
from ..run.directory import open_run
from ..run.files import load_tensor_file
from ..run.layout import AVERAGED


def trainer_checkpointer(tr) -> Checkpointer:
    """Every stateful piece of a Trainer's run, saved and restored by one Checkpointer."""
    cfg = tr.cfg
    return Checkpointer(
        Path(cfg.train.run_dir), tr.rank, model=tr.module, engine=tr.engine,
        shared={"trainer": tr, "schedule": tr.schedule, "ntasgd": tr.ntasgd,
                "averager": tr.averager, **({"noise": tr.noise} if tr.noise else {})},
        per_rank={"loader": tr.train_loader, "hidden": HiddenState(tr),
                  "rng": RNGState(tr.device)},  # the RNG last: nothing after it may draw
        meta={"world_size": tr.world, "global_batch": cfg.train.global_batch,
              "engine": cfg.dist.engine})


def open_trainer_run(tr, resume: str | None, overwrite: bool) -> Path | None:
    """Rank 0 opens the run directory (run.directory.open_run: the lock, fresh / resume /
    refuse, the checks, then the run's files), checking a checkpoint's trainer.pt against this
    run first; every rank then loads the checkpoint. A refused or failed start leaves the
    directory as it was. Returns the checkpoint resumed from (None: a fresh run)."""
    start, error = None, None
    if tr.rank == 0:
        def check(start: Path) -> None:
            st = tr.checkpointer.read_shared(start)  # format, world size, batch, engine
            check_resume(tr, st, start)

        try:
            tr.lock, start = open_run(Path(tr.cfg.train.run_dir), tr.cfg, tr.corpus_dir, resume,
                                      overwrite, check=check,
                                      write=lambda run_dir: write_resolved(tr, run_dir))
        except UserError as exc:
            error = str(exc)
    start, error = D.broadcast_object((None if start is None else str(start), error))
    if error is not None:
        raise UserError(error)
    if start is None:
        return None
    start = Path(start)
    tr.checkpointer.load(start, tr.checkpointer.read_shared(start))
    if tr.averager.count > 0:
        tr.averager.load_average(load_tensor_file(start / AVERAGED))
    tr.last_saved = tr.step
    return start


def resolved(tr) -> dict:
    """What this run derived from its config: the lr rule (optim.LRScaling) and the batch
    geometry; config.json's "resolved" block."""
    return {"lr_scaling": tr.schedule.scaling.as_dict(), "batch": tr.batch.as_dict()}


def write_resolved(tr, run_dir: Path) -> None:
    """Add the "resolved" block (`resolved`) to the config.json write_run_files just wrote
    (from_dict skips it; a resume rewrites it with the same values, which check_resume
    ensures)."""
    p = run_dir / "config.json"
    table = json.loads(p.read_text())
    table[RESOLVED] = resolved(tr)
    write_text_atomic(p, json.dumps(table, indent=2, sort_keys=True) + "\n")


def check_resume(tr, st: dict, start: Path) -> None:
    """Refuse a checkpoint whose lr rule or micro batch differ from what this run resolved
    (before anything is written): the lr must not change mid-run because a default or the
    config file did, and the carried hidden states are per micro batch."""
    tr.schedule.check_resume(st["schedule"], str(start))
    micro = st["trainer"].get("micro_batch")
    if micro is not None and int(micro) != tr.micro:
        raise UserError(f"cannot resume from {start}: it ran micro batches of {micro} "
                        f"streams and this run chose {tr.micro} (the carried hidden states "
                        f"are per micro batch); set --train.micro_batch={micro}.")


class HiddenState:
    """The trainer's carried hidden states as a Stateful piece of the rank file."""

    def __init__(self, trainer):
        self.trainer = trainer

    def state_dict(self) -> dict:
        return {"hidden": self.trainer.hidden}

    def load_state_dict(self, sd: dict) -> None:
        h = sd["hidden"]
        self.trainer.hidden = None if h is None else [_to(x, self.trainer.device) for x in h]


def _to(h, device):
    if isinstance(h, torch.Tensor):
        return h.to(device)
    return type(h)(_to(x, device) for x in h)
