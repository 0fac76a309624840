"""The Checkpointer: writes and reads a run's step directories by walking its Stateful pieces
(the Trainer's for `train`, the Search's for `search`).

    checkpoints/step-00001234/
        model.pt          unwrapped model state_dict (rank 0)
        averaged.pt       NT-ASGD averaged parameters, same keys (rank 0, only when averaging)
        trainer.pt        format version, world size, global batch, engine, and the state_dict()
                          of every shared piece (rank 0): train: trainer counters, schedule,
                          NT-ASGD, averager; search: its counters, controller and its optimizer
        optim.pt          optimizer state (local / DDP; DeepSpeed writes deepspeed/ instead)
        rank-00000.pt     per rank: format version, rank, and the state_dict() of every per-rank
                          piece: StreamLoader positions, hidden states, torch (and CUDA) RNG
                          (search: and the cell sampler's generator)
        DONE              written by rank 0 after a barrier, last: without it the step does not
                          exist. JSON: {"format", "step", "best_step", "files"}: the best
                          validation's step (what `eval` and `load_run` use by default) and the
                          size and sha256 of every file above, checked before anything is loaded

Every piece is Stateful (state_dict() / load_state_dict() with plain values and tensors), so
no field is copied by hand: a new piece of state is one more entry in its owner's dicts.
Everything is read back with torch.load(weights_only=True) (files.load_tensor_file).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Protocol

import torch

from ..distributed import barrier
from ..errors import UserError
from .files import load_tensor_file, load_weights, save_file
from .layout import (AVERAGED, CHECKPOINTS, MARKER, MODEL, checkpoint_files, list_checkpoints,
                     step_dir_name, step_of)

FORMAT = 2  # 1: the first layout (hand-wired trainer fields); 2: Stateful pieces + JSON marker


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, sd: dict) -> None: ...


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


class RNGState:
    """torch's (and the device's CUDA) generator, and any named torch.Generator of the run's
    own (`generators`), as a Stateful piece."""

    def __init__(self, device: torch.device, **generators: torch.Generator):
        self.device, self.generators = device, generators

    def state_dict(self) -> dict:
        st = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            st["cuda"] = torch.cuda.get_rng_state(self.device)
        st.update({name: g.get_state() for name, g in self.generators.items()})
        return st

    def load_state_dict(self, st: dict) -> None:
        torch.set_rng_state(st["torch"])
        if self.device.type == "cuda" and "cuda" in st:
            torch.cuda.set_rng_state(st["cuda"], self.device)
        for name, g in self.generators.items():
            g.set_state(st[name])


class Checkpointer:
    """Writes and reads step directories of one run (collective: every rank calls save/load).

    `meta` is checked on load (world size, global batch: the stream layout depends on them);
    `shared` pieces are saved by rank 0 into trainer.pt, `per_rank` pieces by each rank into its
    rank file, and loaded back in dict order (put the RNG last: nothing after it may draw).
    """

    def __init__(self, run_dir: Path, rank: int, *, model: torch.nn.Module, engine,
                 shared: dict[str, Stateful], per_rank: dict[str, Stateful], meta: dict):
        self.root = Path(run_dir) / CHECKPOINTS
        self.rank = rank
        self.model, self.engine = model, engine
        self.shared, self.per_rank, self.meta = shared, per_rank, meta

    def save(self, step: int, *, averaged: dict | None, best_step: int, keep_last: int) -> Path:
        """Write step_dir; a failed write (disk full, permissions) removes the partial step and
        is one UserError: the previous checkpoints stay as they were."""
        step_dir = self.root / step_dir_name(step)
        try:
            if self.rank == 0:
                if step_dir.exists():  # left over from a run killed while writing: start clean
                    shutil.rmtree(step_dir)
                step_dir.mkdir(parents=True)
            barrier()
            if self.rank == 0:
                save_file(self.model.state_dict(), step_dir / MODEL)
                if averaged is not None:
                    save_file(averaged, step_dir / AVERAGED)
                save_file({"format": FORMAT, **self.meta,
                           **{k: v.state_dict() for k, v in self.shared.items()}},
                          step_dir / "trainer.pt")
            self.engine.save(step_dir, self.rank)
            save_file({"format": FORMAT, "rank": self.rank,
                       **{k: v.state_dict() for k, v in self.per_rank.items()}},
                      step_dir / rank_file(self.rank))
            barrier()  # every rank has finished writing
            if self.rank == 0:
                marker = {"format": FORMAT, "step": step, "best_step": best_step,
                          "files": checkpoint_files(step_dir)}
                tmp = step_dir / (MARKER + ".tmp")
                tmp.write_text(json.dumps(marker) + "\n")
                os.replace(tmp, step_dir / MARKER)
        except OSError as exc:
            if self.rank == 0:
                shutil.rmtree(step_dir, ignore_errors=True)
            done = list_checkpoints(self.root.parent)
            prev = (f"continue with --resume auto from {done[-1]}, which is intact" if done else
                    "start the run again (no earlier checkpoint exists)")
            raise UserError(f"cannot write checkpoint {step_dir}: {exc.strerror or exc}"
                            f"{' (' + exc.filename + ')' if exc.filename else ''}; free disk "
                            f"space or fix the permissions of train.run_dir, then {prev}.") from None
        if self.rank == 0:
            prune(self.root.parent, keep_last, {step, best_step})
        barrier()
        return step_dir

    def read_shared(self, step_dir: Path) -> dict:
        """trainer.pt, checked against this run (format, world size, global batch)."""
        st = load_tensor_file(step_dir / "trainer.pt")
        check_compatible(step_dir, st, self.meta)
        return st

    def load(self, step_dir: Path, shared: dict) -> None:
        """Model, optimizer (engine), shared pieces (from `shared`, read by read_shared), then
        this rank's pieces."""
        load_weights(self.model, step_dir, averaged=False)
        self.engine.load(step_dir, self.rank)
        # a piece the checkpoint predates (the noise scale's EMAs) gets {}: it starts afresh
        for k, piece in self.shared.items():
            piece.load_state_dict(shared.get(k, {}))
        mine = load_tensor_file(step_dir / rank_file(self.rank))
        for k, piece in self.per_rank.items():
            piece.load_state_dict(mine[k])


def check_compatible(step_dir: Path, st: dict, meta: dict) -> None:
    """A checkpoint of another format, world size, global batch or engine is refused, with
    what to do."""
    fmt = st.get("format", 1)
    if fmt != FORMAT:
        raise UserError(f"cannot resume from {step_dir}: it has checkpoint format {fmt} and this "
                        f"dist-lm reads format {FORMAT}. Continue it with the dist-lm version that "
                        f"wrote it, or start a new run from its weights with "
                        f"--train.finetune_from={step_dir}.")
    if int(st["world_size"]) != meta["world_size"]:
        raise UserError(f"cannot resume from {step_dir}: it was written by {st['world_size']} "
                        f"rank(s) and this run has {meta['world_size']}. Per-rank streams, hidden "
                        f"states and RNG states only continue exactly with the same number of "
                        f"ranks; relaunch with {st['world_size']} rank(s) or start a new "
                        f"train.run_dir.")
    if int(st["global_batch"]) != meta["global_batch"]:
        raise UserError(f"cannot resume from {step_dir}: it used train.global_batch="
                        f"{st['global_batch']} and this run asks for {meta['global_batch']}. The "
                        f"stream layout depends on it; set --train.global_batch="
                        f"{st['global_batch']} or start a new train.run_dir.")
    if st["engine"] != meta["engine"] and "deepspeed" in (st["engine"], meta["engine"]):
        raise UserError(f"cannot resume from {step_dir}: it was written by dist.engine="
                        f"{st['engine']}; set --dist.engine={st['engine']}.")


def prune(run_dir: Path, keep_last: int, keep: set[int]) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, except those in `keep`."""
    if keep_last <= 0:
        return
    for p in list_checkpoints(run_dir)[:-keep_last]:
        if step_of(p) not in keep:
            shutil.rmtree(p, ignore_errors=True)
