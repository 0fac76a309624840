"""The fused QRNN step: gate nonlinearities, zoneout, forget-mult and output gate as one op.

    from dist_lm.kernels import qrnn_fused
    h, c_last = qrnn_fused(y, c0, mask, scale)

y [T, b, 3H] is the gate matmul's output, the z | f | o pre-activations along the last dim (as
QRNNLayer's F.linear makes them); c0 [b, H] the previous carry (None: zeros); mask [T, b, H]
the zoneout keep-mask on f (bool or 0/1 floats; None: no mask) and scale a factor on f (eval-mode
zoneout: 1 - p). Per lane:

    z = tanh(y_z), f = sigmoid(y_f) * mask * scale, o = sigmoid(y_o)
    c_t = f_t z_t + (1 - f_t) c_{t-1},   h_t = o_t c_t

Returns h [T, b, H] in y's dtype and c_last = c_{T-1} [b, H] in fp32 (float64 for float64 y;
c0 when T = 0): the next window's carry, never rounded to the activation dtype; it may take a
gradient. The cell states c [T, b, H] the backward needs are saved in y's dtype (on CUDA; the
CPU kernel keeps them in fp32, see below), so a 16-bit step moves 2-byte c, not 4-byte, and
only the one [b, H] carry is written in fp32. Under the `unfused()` benchmark switch c_last is
the unfused sequence's c[-1], computed in y's dtype and widened.

Implementations of one op:
  qrnn_fused_reference  the unfused sequence QRNNLayer ran before (chunk, sigmoid, mask, tanh,
                        the forget_mult op, output gate) with autograd through it: tests, and
                        the fallback for dtypes/devices the kernels below do not take
  CUDA                  qrnn_fused_triton.py: forward and backward kernels, the recurrence in
                        fp32 registers; h and the saved c in y's dtype, c_last fp32
  CPU                   qrnn_fused_cpu.py: a C kernel (csrc/qrnn_fused.c) in fp32, forward and
                        backward, one pass over T per lane; the reference path in fp32 where no
                        C compiler is found. bf16/fp16 gates are widened to fp32 for it and h is
                        cast back (the saved c stays fp32): the kernel has one dtype, and 16-bit
                        activations on CPU (autocast tests, rehearsals) are not worth a second
                        one that would round c only to save host memory
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor

from .forget_mult import forget_mult


def qrnn_fused_reference(y: Tensor, c0: Tensor | None = None, mask: Tensor | None = None,
                         scale: float = 1.0) -> tuple[Tensor, Tensor]:
    z, f, o = y.chunk(3, dim=2)
    f = torch.sigmoid(f)
    if mask is not None:
        f = f * mask.to(f.dtype)
    if scale != 1.0:
        f = f * scale
    c = forget_mult(f, torch.tanh(z), c0)
    return torch.sigmoid(o) * c, _last(c, c0)


def _last(c: Tensor, c0: Tensor) -> Tensor:
    """c[-1] (c0 when c is empty), at least fp32: the carry handed to the next window."""
    last = c[-1] if c.size(0) else c0
    return last.to(torch.promote_types(last.dtype, torch.float32))


class _FusedCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, c0, mask, scale):
        from . import qrnn_fused_cpu

        ctx.set_materialize_grads(False)  # c_last's gradient is usually None
        mask = qrnn_fused_cpu.byte_mask(mask)
        h, c = qrnn_fused_cpu.forward(y, c0, mask, scale)
        ctx.save_for_backward(y, c0, mask, c)
        ctx.scale = scale
        return h, _last(c, c0).clone()  # a tensor of its own, not a view of the saved c

    @staticmethod
    def backward(ctx, gh, gc):
        from . import qrnn_fused_cpu

        y, c0, mask, c = ctx.saved_tensors
        if gh is None:
            gh = torch.zeros_like(c)
        dy, dc0 = qrnn_fused_cpu.backward(gh.float(), None if gc is None else gc.float(), y, c0,
                                          mask, c, ctx.scale)
        return dy, dc0, None, None


class _FusedTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, c0, mask, scale):
        from .qrnn_fused_triton import qrnn_fused_triton_forward

        ctx.set_materialize_grads(False)
        h, c, c_last = qrnn_fused_triton_forward(y, c0, mask, scale)
        ctx.save_for_backward(y, c0, mask, c)  # c in y's dtype: only the backward reads it
        ctx.scale = scale
        return h, c_last

    @staticmethod
    def backward(ctx, gh, gc):
        from .qrnn_fused_triton import qrnn_fused_triton_backward

        y, c0, mask, c = ctx.saved_tensors
        if gh is None:
            gh = torch.zeros_like(c)
        # dL/dc_last starts the kernel's fp32 reverse carry at t = T-1
        dy, dc0 = qrnn_fused_triton_backward(gh, gc, y, c0, mask, c, ctx.scale)
        return dy, dc0, None, None


_switch = threading.local()  # .unfused: set inside `unfused()`


@contextlib.contextmanager
def unfused():
    """Inside the block qrnn_fused runs as qrnn_fused_reference (the unfused sequence the layer
    ran before): for benchmarks that compare both in one process."""
    before = getattr(_switch, "unfused", False)
    _switch.unfused = True
    try:
        yield
    finally:
        _switch.unfused = before


def _cpu_kernel_available() -> bool:
    from . import qrnn_fused_cpu

    return qrnn_fused_cpu.library() is not None


def qrnn_fused(y: Tensor, c0: Tensor | None = None, mask: Tensor | None = None,
               scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """h [T, b, H] and the carry c_last [b, H] (fp32) for gate pre-activations y [T, b, 3H]
    (see the module docstring)."""
    if y.dim() != 3 or y.size(2) % 3:
        raise ValueError(f"qrnn_fused expects y of shape [T, b, 3H]; got {tuple(y.shape)}")
    T, b, H = y.size(0), y.size(1), y.size(2) // 3
    if mask is not None and mask.shape != (T, b, H):
        raise ValueError(f"zoneout mask of shape {tuple(mask.shape)} for y {tuple(y.shape)}; "
                         f"expected {(T, b, H)}")
    if c0 is None:
        c0 = y.new_zeros(b, H, dtype=torch.float32 if y.is_cuda else y.dtype)
    c0 = c0.reshape(b, H)
    if getattr(_switch, "unfused", False):
        return qrnn_fused_reference(y, c0, mask, scale)
    if y.is_cuda:
        return _FusedTriton.apply(y.contiguous(), c0.contiguous(), mask, float(scale))
    if y.dtype == torch.float64:  # gradcheck and float64 references: the unfused sequence
        return qrnn_fused_reference(y, c0.to(y.dtype), mask, scale)
    # CPU: the recurrence in fp32 (as the CUDA kernels keep their carry); low-precision gates
    # are widened here and h goes back to their dtype, so the carry is never rounded
    yf, c0f = y.float(), c0.float()
    if y.device.type == "cpu" and _cpu_kernel_available():
        h, c_last = _FusedCPU.apply(yf.contiguous(), c0f.contiguous(), mask, float(scale))
    else:
        h, c_last = qrnn_fused_reference(yf, c0f, mask, scale)
    return h.to(y.dtype), c_last
