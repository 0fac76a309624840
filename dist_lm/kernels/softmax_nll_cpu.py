"""The softmax loss on CPU: the C kernel csrc/softmax_nll.c (fp32), called by models/heads.py.

Forward, one read of each row of logits x [N, V]: its log-sum-exp lse and nll = lse - x[target]
(the max first, then the sum of exp in a second pass that finds the row in cache). Backward, one
read and one write: (exp(x - lse) - onehot(target)) g. exp is the kernel's own vectorisable
polynomial (csrc/exp_gate.h). Rows are split over torch.get_num_threads() threads
(c_threads.py). Built by c_loader.py; where it cannot be built, `library()` is None and
heads.py takes its torch path.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .c_loader import CKernel
from .c_threads import ptr, split

_i64, _p = ctypes.c_int64, ctypes.c_void_p
KERNEL = CKernel("softmax_nll", {
    "softmax_nll_fwd": [_p] * 4 + [_i64] * 3,
    "softmax_nll_bwd": [_p] * 5 + [_i64] * 3,
})


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot be built."""
    return KERNEL.library()


def forward(x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(nll, lse) per row of contiguous fp32 logits x [N, V] for contiguous int64 targets [N]
    in [0, V) (the kernel reads x[i, targets[i]]: callers check the range)."""
    N, V = x.shape
    lse, nll = x.new_empty(N), x.new_empty(N)
    split(library().softmax_nll_fwd, [ptr(x), ptr(targets), ptr(lse), ptr(nll), V], N, N * V)
    return nll, lse


def backward(x: Tensor, targets: Tensor, lse: Tensor, g: Tensor) -> Tensor:
    """dL/dx of sum_i g_i nll_i: (softmax(x) - onehot(targets)) * g[:, None]."""
    N, V = x.shape
    g = g.contiguous().float()
    gx = torch.empty_like(x)
    split(library().softmax_nll_bwd, [ptr(x), ptr(targets), ptr(lse), ptr(g), ptr(gx), V],
          N, N * V)
    return gx
