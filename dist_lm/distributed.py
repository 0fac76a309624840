"""Process-group helpers: init from the torchrun / deepspeed environment, rank queries.

torchrun and the deepspeed launcher both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT; `init_distributed` reads them. With none set, everything runs as one
process and the helpers answer rank 0 of 1.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def env_world_size() -> int:
    """World size announced by the launcher (1 when not launched by torchrun/deepspeed)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else env_world_size()


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return get_rank() == 0


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device, backend: str = "auto") -> None:
    """Join the process group the launcher describes (no-op for a single process)."""
    if is_initialized() or env_world_size() == 1 and "MASTER_ADDR" not in os.environ:
        return
    if backend == "auto":
        backend = default_backend(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (identity for one process); returns it."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def pick_device(name: str = "auto") -> torch.device:
    """'auto' is the local rank's GPU when CUDA is available, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", get_local_rank() % max(1, torch.cuda.device_count()))
