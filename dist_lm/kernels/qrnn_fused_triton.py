"""Triton kernels of the fused QRNN step (dist_lm.kernels.qrnn_fused): gates, zoneout,
forget-mult and output gate in one pass over T, forward and backward.

Input is the gate matmul's output y [T, b, 3H] (z | f | o pre-activations along the last dim).
One program owns BLOCK consecutive columns j of one batch row and walks T with the carry c in
fp32 registers; loads and stores are in the tensors' own dtype (fp32, bf16, fp16).

  forward   reads y (3), the zoneout mask (1, bytes or floats, optional), c0 [b, H]; writes h
            and c (2, in y's dtype: c is kept for the backward only) and c_last [b, H] in fp32,
            the register carry after the last step (the state the next window starts from)
  backward  reads dL/dh, y, c, mask, c0 and dL/dc_last [b, H] (optional: it starts the fp32
            reverse carry); writes dL/dy (3) and dL/dc0 [b, H]
            (the gate activations are recomputed from y rather than saved)

about 12-13 [T, b, H] passes in all, where the unfused torch sequence makes about 43; the fp32
carry adds one [b, H] write forward and one read backward, not a pass over T.
Each step's loads for the next step are issued before the current step's arithmetic (software
pipelining: the memory latency of step t+1 hides behind the math and stores of step t).
H is passed as H_DIV * ALIGN with ALIGN the largest power of two (<= 16) dividing H, so the
compiler knows every row offset's alignment and the bound j < H and emits vector loads for any H
that is a multiple of 4 (fp32) / 8 (16-bit), not only multiples of 16.

Run on CPU tensors under TRITON_INTERPRET=1 by the tests (set before this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .forget_mult_triton import pow2_divisor

BLOCK = 256
NUM_WARPS = 2
_SIZES = ("T", "B", "H_DIV")  # not specialized on their value: see forget_mult_triton._SIZES


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit(do_not_specialize=_SIZES)
def _qrnn_fwd(Y, C0, M, HOUT, C, CLAST, T, B, H_DIV, scale,
              HAS_MASK: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    H = H_DIV * ALIGN  # a multiple of ALIGN the compiler can see
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row = tl.program_id(1)
    lane = j < H
    ys, hs = B * 3 * H, B * H  # one timestep of y, of h/c/mask
    y_ptr = Y + row * 3 * H + j
    hc = row * H + j
    h_ptr, c_ptr, m_ptr = HOUT + hc, C + hc, M + hc
    c = tl.load(C0 + hc, mask=lane, other=0.0).to(tl.float32)
    zn = tl.load(y_ptr, mask=lane, other=0.0)
    fn = tl.load(y_ptr + H, mask=lane, other=0.0)
    on = tl.load(y_ptr + 2 * H, mask=lane, other=0.0)
    mn = tl.load(m_ptr, mask=lane, other=0) if HAS_MASK else zn
    for t in range(T):
        zr, fr, orr, mr = zn, fn, on, mn
        # prefetch step t+1 before computing step t (vector compare: the interpreter takes no
        # scalar bool in a mask)
        nxt = lane & (tl.zeros_like(j) + t + 1 < T)
        y_ptr += ys
        zn = tl.load(y_ptr, mask=nxt, other=0.0)
        fn = tl.load(y_ptr + H, mask=nxt, other=0.0)
        on = tl.load(y_ptr + 2 * H, mask=nxt, other=0.0)
        if HAS_MASK:
            m_ptr += hs
            mn = tl.load(m_ptr, mask=nxt, other=0)
        z = _tanh(zr.to(tl.float32))
        f = tl.sigmoid(fr.to(tl.float32)) * scale
        if HAS_MASK:
            f = f * mr.to(tl.float32)
        o = tl.sigmoid(orr.to(tl.float32))
        c = c + f * (z - c)
        tl.store(c_ptr, c.to(C.dtype.element_ty), mask=lane)
        tl.store(h_ptr, (o * c).to(HOUT.dtype.element_ty), mask=lane)
        c_ptr += hs
        h_ptr += hs
    tl.store(CLAST + hc, c, mask=lane)  # T >= 1 (the wrapper): c is step T-1's, unrounded


@triton.jit(do_not_specialize=_SIZES)
def _qrnn_bwd(GH, GC, Y, C0, M, C, DY, DC0, T, B, H_DIV, scale,
              HAS_MASK: tl.constexpr, HAS_GC: tl.constexpr, ALIGN: tl.constexpr,
              BLOCK: tl.constexpr):
    H = H_DIV * ALIGN
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row = tl.program_id(1)
    lane = j < H
    ys, hs = B * 3 * H, B * H
    hc = row * H + j
    # pointers at t = T-1 (offsets in int64, multiples of ALIGN)
    Y_LAST = (T - 1).to(tl.int64) * ys
    HC_LAST = (T - 1).to(tl.int64) * hs
    y_ptr = Y + Y_LAST + row * 3 * H + j
    dy_ptr = DY + Y_LAST + row * 3 * H + j
    gh_ptr, m_ptr = GH + HC_LAST + hc, M + HC_LAST + hc
    cp_ptr = C + HC_LAST - hs + hc  # c_{t-1} of the current step t
    c0 = tl.load(C0 + hc, mask=lane, other=0.0).to(tl.float32)
    ct = tl.load(C + HC_LAST + hc, mask=lane, other=0.0).to(tl.float32)
    two = tl.zeros_like(j) + T >= 2
    cp = tl.where(two, tl.load(cp_ptr, mask=lane & two, other=0.0).to(tl.float32), c0)
    zn = tl.load(y_ptr, mask=lane, other=0.0)
    fn = tl.load(y_ptr + H, mask=lane, other=0.0)
    on = tl.load(y_ptr + 2 * H, mask=lane, other=0.0)
    ghn = tl.load(gh_ptr, mask=lane, other=0.0)
    mn = tl.load(m_ptr, mask=lane, other=0) if HAS_MASK else zn
    # the reverse carry dL/dc_t not through h_t; at t = T-1 that is dL/dc_last (fp32)
    if HAS_GC:
        carry = tl.load(GC + hc, mask=lane, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(T):
        t = tl.zeros_like(j) + (T - 1 - i)  # as a vector, see the forward
        zr, fr, orr, ghr, mr = zn, fn, on, ghn, mn
        # prefetch step t-1: its y, dL/dh, mask, and its c_{t-2} (c0 at t-1 = 0)
        nxt = lane & (t >= 1)
        y_ptr -= ys
        gh_ptr -= hs
        cp_ptr -= hs
        zn = tl.load(y_ptr, mask=nxt, other=0.0)
        fn = tl.load(y_ptr + H, mask=nxt, other=0.0)
        on = tl.load(y_ptr + 2 * H, mask=nxt, other=0.0)
        ghn = tl.load(gh_ptr, mask=nxt, other=0.0)
        cpn = tl.load(cp_ptr, mask=lane & (t >= 2), other=0.0).to(tl.float32)
        if HAS_MASK:
            m_ptr -= hs
            mn = tl.load(m_ptr, mask=nxt, other=0)
        z = _tanh(zr.to(tl.float32))
        sf = tl.sigmoid(fr.to(tl.float32))
        keep = scale
        if HAS_MASK:
            keep = mr.to(tl.float32) * scale
        f = sf * keep
        o = tl.sigmoid(orr.to(tl.float32))
        gh = ghr.to(tl.float32)
        g = gh * o + carry
        gz = g * f
        d_o = gh * ct * o * (1.0 - o)
        d_z = gz * (1.0 - z * z)
        d_f = g * (z - cp) * keep * sf * (1.0 - sf)
        carry = g - gz
        tl.store(dy_ptr, d_z.to(DY.dtype.element_ty), mask=lane)
        tl.store(dy_ptr + H, d_f.to(DY.dtype.element_ty), mask=lane)
        tl.store(dy_ptr + 2 * H, d_o.to(DY.dtype.element_ty), mask=lane)
        dy_ptr -= ys
        ct = cp
        cp = tl.where(t >= 2, cpn, c0)
    tl.store(DC0 + hc, carry.to(DC0.dtype.element_ty), mask=lane)


def _mask_arg(mask: Tensor | None, dummy: Tensor) -> Tensor:
    if mask is None:
        return dummy  # never read (HAS_MASK is False)
    return mask.contiguous().view(torch.uint8) if mask.dtype == torch.bool else mask.contiguous()


def qrnn_fused_triton_forward(y: Tensor, c0: Tensor, mask: Tensor | None,
                              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """y: [T, b, 3H]; c0: [b, H]; mask: [T, b, H] (bool or 0/1 floats) or None.
    Returns h and c: [T, b, H] in y's dtype (c, the cell states, for the backward), and
    c_last: [b, H] in fp32, the last cell state before rounding (c0 when T = 0): the carry the
    next window starts from is never rounded to the activation dtype."""
    y, c0 = y.contiguous(), c0.contiguous()
    T, B, H3 = y.shape
    H = H3 // 3
    h, c = y.new_empty(T, B, H), y.new_empty(T, B, H)
    if T == 0:
        return h, c, c0.float().clone()
    c_last = y.new_empty(B, H, dtype=torch.float32)
    if B * H > 0:
        align = pow2_divisor(H)
        _qrnn_fwd[(triton.cdiv(H, BLOCK), B)](
            y, c0, _mask_arg(mask, y), h, c, c_last, T, B, H // align, float(scale),
            HAS_MASK=mask is not None, ALIGN=align, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return h, c, c_last


def qrnn_fused_triton_backward(gh: Tensor, gc: Tensor | None, y: Tensor, c0: Tensor,
                               mask: Tensor | None, c: Tensor,
                               scale: float) -> tuple[Tensor, Tensor]:
    """dL/dy [T, b, 3H] (y's dtype) and dL/dc0 [b, H] (c0's dtype) from dL/dh [T, b, H], the
    saved cell states c [T, b, H] and, where c_last received a gradient, dL/dc_last [b, H] (None:
    zero)."""
    gh, y, c0, c = gh.contiguous(), y.contiguous(), c0.contiguous(), c.contiguous()
    T, B, H3 = y.shape
    H = H3 // 3
    dy, dc0 = torch.empty_like(y), torch.empty_like(c0)
    if T == 0:  # c_last was c0
        return dy, (dc0.zero_() if gc is None else dc0.copy_(gc))
    if B * H > 0:
        align = pow2_divisor(H)
        _qrnn_bwd[(triton.cdiv(H, BLOCK), B)](
            gh, gh if gc is None else gc.contiguous(), y, c0, _mask_arg(mask, y), c, dy, dc0,
            T, B, H // align, float(scale),
            HAS_MASK=mask is not None, HAS_GC=gc is not None, ALIGN=align, BLOCK=BLOCK,
            num_warps=NUM_WARPS)
    return dy, dc0
