"""Running a C kernel's independent parts (rows, lanes, Philox blocks) on torch's thread count.

The calling thread and n-1 threads of one shared pool take parts in turn until none is left
(ctypes releases the GIL during a call): a thread that the OS preempts on a shared machine
delays its current part, not a fixed share of the work. A forked child starts a new pool.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

_pool: ThreadPoolExecutor | None = None


def _forget_pool() -> None:  # a forked child has the pool object but none of its threads
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def ptr(t: Tensor | None) -> int | None:
    """A tensor's data pointer for a C argument (None: a null pointer)."""
    return None if t is None else t.data_ptr()


def threads(work_items: int) -> int:
    """torch.get_num_threads(), but no more threads than work items (at least 1)."""
    return max(1, min(torch.get_num_threads(), work_items))


def run_parts(call, parts: list, n: int) -> None:
    """call(part) for every part, on n threads (the calling one and n-1 pool threads), each
    taking the next part when it is free."""
    global _pool
    todo, lock = iter(parts), threading.Lock()

    def work():
        while True:
            with lock:
                part = next(todo, None)
            if part is None:
                return
            call(part)

    if _pool is None or _pool._max_workers != n - 1:  # first call, or a new thread count
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="dist-lm-ckernel")
    helpers = [_pool.submit(work) for _ in range(n - 1)]
    work()
    for fut in helpers:
        fut.result()


def split(fn, args: list, n_items: int, numel: int) -> None:
    """fn(*args, i0, i1) over items 0..n_items-1 (rows, Philox blocks) that hold numel elements
    in all, on the pool; one thread below ~64k elements, where a second costs more than it saves."""
    n = min(threads(numel // 65536 or 1), max(n_items, 1))
    if n == 1:
        fn(*args, 0, n_items)
        return
    k = min(4 * n, n_items)
    run_parts(lambda part: fn(*args, *part),
              [(n_items * i // k, n_items * (i + 1) // k) for i in range(k)], n)
