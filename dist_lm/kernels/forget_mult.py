"""ForgetMult, the QRNN recurrence: h_t = f_t * x_t + (1 - f_t) * h_{t-1}, over [T, b, H].

    from dist_lm.kernels import forget_mult
    h = forget_mult(f, x, h0)        # f, x: [T, b, H]; h0: [b, H] or None (zeros) -> h [T, b, H]

Three implementations, one op:
  forget_mult_reference  plain loop, autograd through it (tests and benchmarks only)
  CPU path               one fused `lerp` per step forward, and an analytic backward, the
                         reverse recurrence g_t = dL/dh_t + (1 - f_{t+1}) g_{t+1} with the input
                         gradients of each step (five ops on a [b, H] slice, no autograd graph)
  Triton (CUDA)          forget_mult_triton.py: one program per block of b*H lanes walks T with
                         an fp32 carry, forward and backward
`torch.ops.dist_lm.forget_mult` is a torch.library custom op (with a fake kernel and autograd
registered), so torch.compile and autocast see a single op; its CUDA kernel is the Triton one,
every other device takes the CPU path. Half/bfloat16 inputs are computed in fp32 and returned in
the input dtype; the carry is always at least fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOW = (torch.float16, torch.bfloat16)


def forget_mult_reference(f: Tensor, x: Tensor, h0: Tensor | None = None) -> Tensor:
    """The recurrence written out step by step (salesforce/pytorch-qrnn's CPU ForgetMult)."""
    h = torch.zeros_like(x[0]) if h0 is None else h0
    out = []
    for t in range(x.size(0)):
        h = f[t] * x[t] + (1 - f[t]) * h
        out.append(h)
    return torch.stack(out)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW else dtype


def forget_mult_cpu_forward(f: Tensor, x: Tensor, h0: Tensor) -> Tensor:
    cdt = _compute_dtype(x.dtype)
    f, x = f.to(cdt).contiguous(), x.to(cdt).contiguous()
    out = torch.empty_like(x)
    h = h0.to(cdt)
    for t in range(x.size(0)):
        h = torch.lerp(h, x[t], f[t], out=out[t])  # h + f (x - h) = f x + (1 - f) h
    return out


def forget_mult_cpu_backward(grad: Tensor, f: Tensor, x: Tensor, h0: Tensor,
                             h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The reverse recurrence, one [b, H] slice at a time into preallocated outputs: slices stay
    in cache, where whole-tensor passes would stream every [T, b, H] temporary through memory."""
    cdt = _compute_dtype(x.dtype)
    grad, f, x, h = (v.to(cdt) for v in (grad, f, x, h))
    h0 = h0.to(cdt)
    gf, gx = torch.empty_like(x), torch.empty_like(x)
    g, carry, diff = torch.empty_like(h0), torch.zeros_like(h0), torch.empty_like(h0)
    for t in range(x.size(0) - 1, -1, -1):
        torch.add(grad[t], carry, out=g)                          # g_t = dL/dh_t, all paths
        torch.mul(g, f[t], out=gx[t])                             # dL/dx_t = g_t f_t
        torch.sub(g, gx[t], out=carry)                            # to h_{t-1}: g_t (1 - f_t)
        torch.sub(x[t], h[t - 1] if t > 0 else h0, out=diff)
        torch.mul(g, diff, out=gf[t])                             # dL/df_t = g_t (x_t - h_{t-1})
    return gf, gx, carry


@torch.library.custom_op("dist_lm::forget_mult", mutates_args=())
def _forget_mult_op(f: Tensor, x: Tensor, h0: Tensor) -> Tensor:
    return forget_mult_cpu_forward(f, x, h0).to(x.dtype)


@_forget_mult_op.register_fake
def _(f, x, h0):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_forget_mult_op.register_kernel("cuda")
def _(f, x, h0):
    from .forget_mult_triton import forget_mult_triton_forward

    return forget_mult_triton_forward(f, x, h0)


@torch.library.custom_op("dist_lm::forget_mult_backward", mutates_args=())
def _forget_mult_backward_op(grad: Tensor, f: Tensor, x: Tensor, h0: Tensor,
                             h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    gf, gx, gh0 = forget_mult_cpu_backward(grad, f, x, h0, h)
    return gf.to(f.dtype), gx.to(x.dtype), gh0.to(h0.dtype)


@_forget_mult_backward_op.register_fake
def _(grad, f, x, h0, h):
    c = torch.contiguous_format
    return (torch.empty_like(f, memory_format=c), torch.empty_like(x, memory_format=c),
            torch.empty_like(h0, memory_format=c))


@_forget_mult_backward_op.register_kernel("cuda")
def _(grad, f, x, h0, h):
    from .forget_mult_triton import forget_mult_triton_backward

    return forget_mult_triton_backward(grad, f, x, h0, h)


def _setup_context(ctx, inputs, output):
    f, x, h0 = inputs
    ctx.save_for_backward(f, x, h0, output)


def _backward(ctx, grad):
    f, x, h0, h = ctx.saved_tensors
    return _forget_mult_backward_op(grad.contiguous(), f, x, h0, h)


_forget_mult_op.register_autograd(_backward, setup_context=_setup_context)


def forget_mult(f: Tensor, x: Tensor, h0: Tensor | None = None) -> Tensor:
    """h_t = f_t * x_t + (1 - f_t) * h_{t-1} for t = 0..T-1 with h_{-1} = h0 (zeros if None).

    f, x: [T, b, H] (same dtype); h0: [b, H]. Returns h: [T, b, H] in x's dtype.
    """
    if f.shape != x.shape or f.dim() != 3:
        raise ValueError(f"forget_mult expects f and x of one shape [T, b, H]; got {tuple(f.shape)} "
                         f"and {tuple(x.shape)}")
    if h0 is None:
        h0 = x.new_zeros(x.shape[1:])
    return _forget_mult_op(f.contiguous(), x.contiguous(), h0.reshape(x.shape[1:]).contiguous())
