"""Weight drop on CPU: the C kernel csrc/weight_drop.c, called by models/dropout.py.

Draw, compare, scale and multiply in one pass: element i is kept (x / keep) where its
Philox4x32-10 draw (kernels/philox.py has the layout and the plain reference) is below the
threshold. The backward is the same call on the gradient: the mask is recomputed from the seed,
never stored. Philox blocks are split over torch.get_num_threads() threads (c_threads.py), with
the same result on any number of them. Built by c_loader.py; where it cannot be built,
`library()` is None and dropout.py draws the same masks in torch.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .c_loader import CKernel
from .c_threads import ptr, split
from .philox import K

_i64, _p = ctypes.c_int64, ctypes.c_void_p
KERNEL = CKernel("weight_drop", {
    "wdrop": [_p, _p, _i64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, _i64, _i64],
    "philox_fill": [_p, _i64, ctypes.c_uint64, _i64, _i64],
})


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot be built."""
    return KERNEL.library()


def _blocks(fn, args: list, numel: int) -> None:
    """fn(*args, blk0, blk1) over the Philox blocks of numel elements."""
    split(fn, args, -(-numel // (4 * K)), numel)


def weight_drop(x: Tensor, seed: int, thr: int, scale: float) -> Tensor:
    """x * scale where the element's Philox draw (kernels/philox.py) is below thr, else 0;
    x: fp32 (made contiguous). The backward of weight drop is the same call on the gradient."""
    lib = library()
    x = x.contiguous()
    out = torch.empty_like(x)
    _blocks(lib.wdrop, [ptr(x), ptr(out), x.numel(), seed, thr, scale], x.numel())
    return out


def philox_fill(n: int, seed: int) -> Tensor:
    """The n draws weight_drop compares with thr (as int64 in [0, 2**32)): for tests."""
    bits = torch.empty(n, dtype=torch.int32)
    _blocks(library().philox_fill, [ptr(bits), n, seed], n)
    return bits.to(torch.int64) & 0xFFFFFFFF
