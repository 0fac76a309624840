"""The fused QRNN step on CPU: the C kernel csrc/qrnn_fused.c (fp32), called by qrnn_fused.py.

One pass over T per lane forward (gate nonlinearities, zoneout mask, recurrence, output gate) and
one backward (the gates recomputed from the pre-activations, the reverse recurrence, all three
gate gradients written straight into the [T, b, 3H] input gradient): forward reads y and the
mask and writes h and c (fp32; c[-1] is the carry), backward reads dL/dh, y, c, the mask and
dL/dc[-1] and writes dL/dy. Unfused, the same work is about twenty torch ops on [T, b, H]
tensors plus one or five single-threaded ops per step of the recurrence, each streaming through
memory; here a lane's row of H floats stays in L1 from one step to the next. exp is the kernel's
own (vectorisable) polynomial (csrc/exp_gate.h), within a few ulp of torch's sigmoid and tanh.
The b x H lanes are split over torch.get_num_threads() threads (c_threads.py). Built by
c_loader.py; where it cannot be built, `library()` is None and qrnn_fused.py takes the unfused
torch path.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .c_loader import CKernel
from .c_threads import ptr, run_parts, threads

_i64, _p, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
KERNEL = CKernel("qrnn_fused", {
    "qrnn_fwd": [_p, _p, _p, _f32, _p, _p] + [_i64] * 7,
    "qrnn_bwd": [_p, _p, _p, _p, _p, _p, _f32, _p, _p] + [_i64] * 7,
})


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot be built."""
    return KERNEL.library()


def _parallel(fn, args: list, T: int, B: int, H: int) -> None:
    """fn(*args, T, B, H, b0, b1, j0, j1) over the b x H lanes, in a few parts per thread (whole
    rows of b when there are enough, else column ranges of each row)."""
    n = threads(B * H // 1024 or 1)
    if n == 1:
        fn(*args, T, B, H, 0, B, 0, H)
        return
    k = 4 * n  # parts
    if B >= k:
        parts = [(B * i // k, B * (i + 1) // k, 0, H) for i in range(k)]
    else:
        per_row = -(-k // B)
        parts = [(bi, bi + 1, H * i // per_row, H * (i + 1) // per_row)
                 for bi in range(B) for i in range(per_row)]
    run_parts(lambda part: fn(*args, T, B, H, *part), parts, n)


def byte_mask(mask: Tensor | None) -> Tensor | None:
    """The zoneout mask as one byte per lane: bool/uint8 as they are, 0/1 floats converted."""
    if mask is None:
        return None
    return (mask if mask.dtype in (torch.bool, torch.uint8) else mask != 0).contiguous().view(
        torch.uint8)


def forward(y: Tensor, c0: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """y: contiguous fp32 [T, b, 3H] pre-activations; c0: fp32 [b, H]; mask: byte_mask's
    [T, b, H] or None. Returns h, c: [T, b, H]."""
    lib = library()
    T, B, H3 = y.shape
    H = H3 // 3
    c0 = c0.contiguous()  # named: each pointer below must outlive the call
    c, h = y.new_empty(T, B, H), y.new_empty(T, B, H)
    _parallel(lib.qrnn_fwd, [ptr(y), ptr(c0), ptr(mask), scale, ptr(c), ptr(h)], T, B, H)
    return h, c


def backward(gh: Tensor, gc: Tensor | None, y: Tensor, c0: Tensor, mask: Tensor | None,
             c: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Gradients (dL/dy [T, b, 3H], dL/dc0 [b, H]) from dL/dh (gh [T, b, H]) and dL/dc[-1]
    (gc [b, H], the carry's gradient, or None when it received none); fp32 throughout."""
    lib = library()
    T, B, H3 = y.shape
    H = H3 // 3
    gh = gh.contiguous()
    gc = None if gc is None else gc.contiguous()
    c0 = c0.contiguous()
    dy, dc0 = torch.empty_like(y), torch.empty_like(c0)
    _parallel(lib.qrnn_bwd, [ptr(y), ptr(c0), ptr(mask), ptr(c), ptr(gh), ptr(gc), scale,
                             ptr(dy), ptr(dc0)], T, B, H)
    return dy, dc0
