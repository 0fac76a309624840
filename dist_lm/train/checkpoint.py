"""The training side of checkpoints: write a step directory from every rank, read it back.

    checkpoints/step-00001234/
        model.pt          unwrapped model state_dict (rank 0)
        averaged.pt       NT-ASGD averaged parameters, same keys (rank 0, only when averaging)
        trainer.pt        counters, schedule, NT-ASGD, averaging count, world size, global batch (rank 0)
        optim.pt          optimizer state (local / DDP; DeepSpeed writes deepspeed/ instead)
        rank-00000.pt     per rank: torch (and CUDA) RNG, StreamLoader position, hidden states
        DONE              written by rank 0 after a barrier, last: without it the step does not exist

Everything is read back with torch.load(weights_only=True) (dist_lm.runs.load_tensor_file).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..distributed import barrier
from ..errors import UserError
from ..runs import MARKER, STEP_RE, list_checkpoints, load_tensor_file, step_dir_name


def save_file(obj, path: Path) -> None:
    """torch.save under a temporary name, then rename: a file is either whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def save_checkpoint(run_dir: Path, step: int, rank: int, *, model_state: dict | None,
                    averaged_state: dict | None, trainer_state: dict, rank_state: dict,
                    engine, keep_last: int, keep: set[int] = frozenset()) -> Path:
    """Collective: every rank calls it. Returns the step directory."""
    step_dir = Path(run_dir) / "checkpoints" / step_dir_name(step)
    if rank == 0:
        if step_dir.exists():  # left over from a run killed while writing: start clean
            shutil.rmtree(step_dir)
        step_dir.mkdir(parents=True)
    barrier()
    if rank == 0:
        save_file(model_state, step_dir / "model.pt")
        if averaged_state is not None:
            save_file(averaged_state, step_dir / "averaged.pt")
        save_file(trainer_state, step_dir / "trainer.pt")
    engine.save(step_dir, rank)
    save_file(rank_state, step_dir / rank_file(rank))
    barrier()  # every rank has finished writing
    if rank == 0:
        (step_dir / MARKER).write_text(f"{step}\n")
        prune(run_dir, keep_last, keep | {step})
    barrier()
    return step_dir


def prune(run_dir: Path, keep_last: int, keep: set[int]) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, except those in `keep`."""
    if keep_last <= 0:
        return
    ckpts = list_checkpoints(run_dir)
    for p in ckpts[:-keep_last]:
        if int(STEP_RE.match(p.name).group(1)) not in keep:
            shutil.rmtree(p, ignore_errors=True)


def load_trainer_state(step_dir: Path, world_size: int, global_batch: int) -> dict:
    """trainer.pt, refusing a checkpoint written with another world size or global batch."""
    st = load_tensor_file(step_dir / "trainer.pt")
    if int(st["world_size"]) != world_size:
        raise UserError(f"cannot resume from {step_dir}: it was written by {st['world_size']} "
                        f"rank(s) and this run has {world_size}. Per-rank streams, hidden states "
                        f"and RNG states only continue exactly with the same number of ranks; "
                        f"relaunch with {st['world_size']} rank(s) or start a new train.run_dir.")
    if int(st["global_batch"]) != global_batch:
        raise UserError(f"cannot resume from {step_dir}: it used train.global_batch="
                        f"{st['global_batch']} and this run asks for {global_batch}. The stream "
                        f"layout depends on it; set --train.global_batch={st['global_batch']} "
                        f"or start a new train.run_dir.")
    return st


def load_rank_state(step_dir: Path, rank: int) -> dict:
    return load_tensor_file(step_dir / rank_file(rank))


def rng_state(device: torch.device) -> dict:
    st = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)
