"""Triton ForgetMult kernels (forward and backward) for CUDA tensors.

The b*H lanes of a [T, b, H] problem are independent; one program owns BLOCK lanes and walks
the T steps with the carry in fp32 registers, reading fp32/bf16/fp16 and writing the input
dtype. Forward reads f, x and writes h (3 T b H elements); backward reads dL/dh, f, x, h and
writes dL/df, dL/dx (6 T b H) plus dL/dh0. Launches go on the current torch stream (Triton
asks torch for it). Tests run these kernels on CPU tensors under TRITON_INTERPRET=1, which must
be set before this module is imported (triton.jit reads it at decoration time).

Two things keep the T loop from stalling on memory:
- each step issues the next step's loads before its own arithmetic and store (a two-deep
  software pipeline), so a step no longer waits for loads it could have started a step earlier;
- the row length N = b*H reaches the kernel as N_DIV * ALIGN, ALIGN the largest power of two
  (<= 16) dividing N. Triton only knows the alignment of integer arguments divisible by 16;
  for any other N (b*H = 20*1150 at PTB sizes) the offsets t*N and the bound offs < N had
  unknown alignment and every load and store was a scalar one (ld.global.b32), where now
  N % 4 == 0 gives 16-byte vector loads for fp32 (tests compile the kernels to PTX to check).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 512
# Integer arguments Triton must not specialize on their value. By default the JIT compiles a
# variant where an int equals 1 (a constant: (T - 1).to(...) then fails to compile, a one-token
# window) and another where it is a multiple of 16 (a recompile whenever variable BPTT moves T
# across one). ALIGN already tells the compiler what matters for vector access.
_SIZES = ("T", "N_DIV")


@triton.jit(do_not_specialize=_SIZES)
def _forget_mult_fwd(F, X, H0, OUT, T, N_DIV, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    N = N_DIV * ALIGN  # a multiple of ALIGN the compiler can see
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    h = tl.load(H0 + offs, mask=mask, other=0.0).to(tl.float32)
    f_ptr, x_ptr, o_ptr = F + offs, X + offs, OUT + offs
    f_next = tl.load(f_ptr, mask=mask, other=0.0)
    x_next = tl.load(x_ptr, mask=mask, other=0.0)
    for t in range(T):
        f, x = f_next.to(tl.float32), x_next.to(tl.float32)
        f_ptr += N  # pointer arithmetic is 64-bit: no int32 overflow at large T*b*H
        x_ptr += N
        # step t+1's loads go out before step t's math (a vector compare: the interpreter
        # takes no scalar bool in a mask)
        more = mask & (tl.zeros_like(offs) + t + 1 < T)
        f_next = tl.load(f_ptr, mask=more, other=0.0)
        x_next = tl.load(x_ptr, mask=more, other=0.0)
        h = h + f * (x - h)
        tl.store(o_ptr, h.to(OUT.dtype.element_ty), mask=mask)
        o_ptr += N


@triton.jit(do_not_specialize=_SIZES)
def _forget_mult_bwd(GH, F, X, H0, H, GF, GX, GH0, T, N_DIV, ALIGN: tl.constexpr,
                     BLOCK: tl.constexpr):
    N = N_DIV * ALIGN
    LAST = (T - 1).to(tl.int64) * N  # offset of step T-1: int64, and a multiple of ALIGN
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    carry = tl.zeros([BLOCK], dtype=tl.float32)
    h0 = tl.load(H0 + offs, mask=mask, other=0.0).to(tl.float32)
    # from t = T-1 down to 0; h_{t-1} = H[t-1], h0 at t = 0
    gh_ptr, f_ptr, x_ptr = GH + LAST + offs, F + LAST + offs, X + LAST + offs
    gf_ptr, gx_ptr, hp_ptr = GF + LAST + offs, GX + LAST + offs, H + LAST - N + offs
    gh_next = tl.load(gh_ptr, mask=mask, other=0.0)
    f_next = tl.load(f_ptr, mask=mask, other=0.0)
    x_next = tl.load(x_ptr, mask=mask, other=0.0)
    hp_next = tl.load(hp_ptr, mask=mask & (tl.zeros_like(offs) + T >= 2), other=0.0)
    for i in range(T):
        t = tl.zeros_like(offs) + (T - 1 - i)  # as a vector, see the forward
        g = gh_next.to(tl.float32) + carry
        f, x = f_next.to(tl.float32), x_next.to(tl.float32)
        hp = tl.where(t >= 1, hp_next.to(tl.float32), h0)
        gh_ptr -= N
        f_ptr -= N
        x_ptr -= N
        hp_ptr -= N
        more = mask & (t >= 1)  # step t-1's loads go out before step t's math
        gh_next = tl.load(gh_ptr, mask=more, other=0.0)
        f_next = tl.load(f_ptr, mask=more, other=0.0)
        x_next = tl.load(x_ptr, mask=more, other=0.0)
        hp_next = tl.load(hp_ptr, mask=mask & (t >= 2), other=0.0)
        tl.store(gf_ptr, (g * (x - hp)).to(GF.dtype.element_ty), mask=mask)
        tl.store(gx_ptr, (g * f).to(GX.dtype.element_ty), mask=mask)
        carry = g * (1.0 - f)
        gf_ptr -= N
        gx_ptr -= N
    tl.store(GH0 + offs, carry.to(GH0.dtype.element_ty), mask=mask)


def pow2_divisor(n: int, cap: int = 16) -> int:
    """The largest power of two <= cap dividing n (n > 0): the alignment the kernels declare."""
    a = 1
    while a < cap and n % (2 * a) == 0:
        a *= 2
    return a


def _grid(n: int):
    return (triton.cdiv(n, BLOCK),)


def forget_mult_triton_forward(f: Tensor, x: Tensor, h0: Tensor) -> Tensor:
    """f, x: contiguous [T, b, H]; h0: contiguous [b, H] (any float dtype). Returns h in x.dtype."""
    f, x, h0 = f.contiguous(), x.contiguous(), h0.contiguous()
    out = torch.empty_like(x)
    T, n = x.size(0), x[0].numel()
    if T > 0 and n > 0:
        a = pow2_divisor(n)
        _forget_mult_fwd[_grid(n)](f, x, h0, out, T, n // a, ALIGN=a, BLOCK=BLOCK, num_warps=4)
    return out


def forget_mult_triton_backward(grad: Tensor, f: Tensor, x: Tensor, h0: Tensor,
                                h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    grad, f, x, h0, h = (v.contiguous() for v in (grad, f, x, h0, h))
    gf, gx, gh0 = torch.empty_like(f), torch.empty_like(x), torch.empty_like(h0)
    T, n = x.size(0), x[0].numel()
    if T > 0 and n > 0:
        a = pow2_divisor(n)
        _forget_mult_bwd[_grid(n)](grad, f, x, h0, h, gf, gx, gh0, T, n // a, ALIGN=a,
                                     BLOCK=BLOCK, num_warps=4)
    else:
        gh0.zero_()
    return gf, gx, gh0
