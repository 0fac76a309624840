"""Process-group helpers: init from the torchrun / deepspeed environment, rank queries.

torchrun and the deepspeed launcher both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT; `init_distributed` reads them. With none set, everything runs as one
process and the helpers answer rank 0 of 1.
"""

from __future__ import annotations

import os
import re
import socket
import time

import torch
import torch.distributed as dist

from .errors import UserError


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
    if backend == "nccl":
        why = nccl_refusal(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count())
        if why:
            raise UserError(why)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        dist.init_process_group(backend=backend)
        return
    # Under torchrun, the keys of each attempt get their own prefix: after an elastic restart
    # (--max-restarts) with --standalone, torch 2.13's agent store still held the previous
    # attempt's gloo addresses, and every rank of the new attempt dialled the dead ranks
    # ("connectFullMesh failed ... Connection refused"). Same store as env:// would build.
    import datetime

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0,
                          timeout=datetime.timedelta(minutes=30))
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"dist-lm/attempt-{restart}",
                                                                    store),
                            rank=rank, world_size=world)


def setup_process_group(device: torch.device, engine: str, backend: str = "auto") -> None:
    """Join the launcher's process group; torchrun/deepspeed set the environment, a lone
    DDP/DeepSpeed process (engine other than "local") gets a group of one."""
    if engine != "local" and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    init_distributed(device, backend)


def free_port() -> int:
    """A TCP port free on this host now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_threads() -> None:
    """Split the cores between the processes on this node unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def nccl_refusal(local_world: int, devices: int) -> str | None:
    """Why NCCL cannot run `local_world` ranks on `devices` GPUs of one node (NCCL refuses two
    ranks on one GPU: "Duplicate GPU detected"), or None."""
    if local_world <= devices:
        return None
    return (f"{local_world} ranks on this node but only {devices} GPU(s): NCCL refuses two ranks "
            f"on one GPU; start at most {devices} per node, or pass --dist.backend=gloo.")


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN (train.tf32); only CUDA devices have it."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def _released(t: torch.Tensor, limit_s: float = 10.0) -> torch.Tensor:
    """Wait until the collective's worker has let go of `t`. gloo's all_reduce returns when the
    result is in place, but its worker thread drops its references to the tensor (the work and
    its future hold it) a moment later: in about one call of five the count is still 4 on
    return. If the process ends in that moment, the last reference goes away in the worker
    thread after Python has begun to shut down; the tensor's Python object cannot be freed
    there and the process aborts ("terminate called without an active exception", SIGABRT):
    rank 1 of a 2-rank `dist-lm eval`, which exits right after its one all-reduce, did so under
    load. Waiting here makes the caller the last owner. CPU (gloo) tensors only: NCCL's
    watchdog holds CUDA tensors longer by design and frees them without Python."""
    if t.device.type != "cpu":
        return t
    deadline = time.monotonic() + limit_s
    while t._use_count() > 1 and time.monotonic() < deadline:
        time.sleep(1e-4)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (identity for one process); returns it."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        _released(t)
    return t


def pick_device(name: str = "auto") -> torch.device:
    """'auto' is the local rank's GPU when CUDA is available, else the CPU; 'cuda' is the local
    rank's GPU; 'cuda:N' is GPU N. A device this machine lacks is a UserError naming the fix."""
    name = str(name).strip().lower()
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if name != "auto" and m is None:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N "
                        f"(--train.device for train, --device for eval).")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"this torch ({torch.__version__}) has no CUDA (a CPU build)"
            fix = "or install a CUDA build of torch"
        else:
            why = f"this torch has CUDA {torch.version.cuda} but sees no GPU"
            fix = "or check the NVIDIA driver and CUDA_VISIBLE_DEVICES"
        raise UserError(f"device '{name}' requested but {why}; use the CPU "
                        f"(--train.device=cpu for train, --device cpu for eval) {fix}.")
    count = torch.cuda.device_count()
    if m is not None and m.group(1) is not None:
        index = int(m.group(1))
        if index >= count:
            raise UserError(f"device '{name}' does not exist: this machine has {count} CUDA "
                            f"device(s) (cuda:0..cuda:{count - 1}); pick one of them, or cpu.")
        return torch.device("cuda", index)
    return torch.device("cuda", get_local_rank() % max(1, count))


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Maximum of a tensor over ranks in place (identity for one process); returns it."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        _released(t)
    return t


def broadcast_object(obj):
    """rank 0's `obj` on every rank (identity for one process)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
