"""Triton ForgetMult kernels (forward and backward) for CUDA tensors.

The b*H lanes of a [T, b, H] problem are independent; one program owns BLOCK lanes and walks
the T steps with the carry in fp32 registers, reading fp32/bf16/fp16 and writing the input
dtype. Forward reads f, x and writes h (3 T b H elements); backward reads dL/dh, f, x, h and
writes dL/df, dL/dx (6 T b H) plus dL/dh0. Launches go on the current torch stream (Triton
asks torch for it). Tests run these kernels on CPU tensors under TRITON_INTERPRET=1, which must
be set before this module is imported (triton.jit reads it at decoration time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 512


@triton.jit
def _forget_mult_fwd(F, X, H0, OUT, T, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    h = tl.load(H0 + offs, mask=mask, other=0.0).to(tl.float32)
    f_ptr, x_ptr, o_ptr = F + offs, X + offs, OUT + offs
    for _ in range(T):
        f = tl.load(f_ptr, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        h = h + f * (x - h)
        tl.store(o_ptr, h.to(OUT.dtype.element_ty), mask=mask)
        f_ptr += N  # pointer arithmetic is 64-bit: no int32 overflow at large T*b*H
        x_ptr += N
        o_ptr += N


@triton.jit
def _bwd_step(gh_ptr, f_ptr, x_ptr, gf_ptr, gx_ptr, hp, carry, mask):
    """One reverse step given h_{t-1} = hp: stores dL/df_t, dL/dx_t; returns the new carry."""
    g = tl.load(gh_ptr, mask=mask, other=0.0).to(tl.float32) + carry
    f = tl.load(f_ptr, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(gf_ptr, (g * (x - hp)).to(gf_ptr.dtype.element_ty), mask=mask)
    tl.store(gx_ptr, (g * f).to(gx_ptr.dtype.element_ty), mask=mask)
    return g * (1.0 - f)


@triton.jit
def _forget_mult_bwd(GH, F, X, H0, H, GF, GX, GH0, T, N, LAST, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    carry = tl.zeros([BLOCK], dtype=tl.float32)
    # t = T-1 .. 1, where h_{t-1} = H[t-1]; LAST = (T-1)*N, computed on the host (may be int64)
    gh_ptr, f_ptr, x_ptr = GH + LAST + offs, F + LAST + offs, X + LAST + offs
    gf_ptr, gx_ptr, hp_ptr = GF + LAST + offs, GX + LAST + offs, H + LAST - N + offs
    for _ in range(T - 1):
        hp = tl.load(hp_ptr, mask=mask, other=0.0).to(tl.float32)
        carry = _bwd_step(gh_ptr, f_ptr, x_ptr, gf_ptr, gx_ptr, hp, carry, mask)
        gh_ptr -= N
        f_ptr -= N
        x_ptr -= N
        gf_ptr -= N
        gx_ptr -= N
        hp_ptr -= N
    # t = 0, where h_{-1} = h0
    h0 = tl.load(H0 + offs, mask=mask, other=0.0).to(tl.float32)
    carry = _bwd_step(gh_ptr, f_ptr, x_ptr, gf_ptr, gx_ptr, h0, carry, mask)
    tl.store(GH0 + offs, carry.to(GH0.dtype.element_ty), mask=mask)


def _grid(n: int):
    return (triton.cdiv(n, BLOCK),)


def forget_mult_triton_forward(f: Tensor, x: Tensor, h0: Tensor) -> Tensor:
    """f, x: contiguous [T, b, H]; h0: contiguous [b, H] (any float dtype). Returns h in x.dtype."""
    f, x, h0 = f.contiguous(), x.contiguous(), h0.contiguous()
    out = torch.empty_like(x)
    T, n = x.size(0), x[0].numel()
    if T > 0 and n > 0:
        _forget_mult_fwd[_grid(n)](f, x, h0, out, T, n, BLOCK=BLOCK, num_warps=4)
    return out


def forget_mult_triton_backward(grad: Tensor, f: Tensor, x: Tensor, h0: Tensor,
                                h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    grad, f, x, h0, h = (v.contiguous() for v in (grad, f, x, h0, h))
    gf, gx, gh0 = torch.empty_like(f), torch.empty_like(x), torch.empty_like(h0)
    T, n = x.size(0), x[0].numel()
    if T > 0 and n > 0:
        _forget_mult_bwd[_grid(n)](grad, f, x, h0, h, gf, gx, gh0, T, n, (T - 1) * n,
                                     BLOCK=BLOCK, num_warps=4)
    else:
        gh0.zero_()
    return gf, gx, gh0
