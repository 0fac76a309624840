"""Counter-based random bits for CPU weight drop: Philox4x32-10, one 32-bit draw per element.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) maps a
128-bit counter and a 64-bit key to 128 random bits. It is the generator of torch's CUDA
dropout and of Triton's `tl.randint4x`, whose argument order this follows: counter
(lo32(n), hi32(n), 0, 0) for counter number n, key (lo32(seed), hi32(seed)). Because any
element's draw is a function of (seed, its index), the forward can drop a weight without
storing a mask, and the backward recomputes the same mask from the seed (`wdrop` in
kernels/csrc/weight_drop.c), on any number of threads with the same result.

Element i of a flat tensor takes its bits from counter number n and output word o:

    block, r = divmod(i, 4 * K);  o, k = divmod(r, K);  n = block * K + k

so each block of 4K elements is four contiguous runs of K, one per output word (the layout a
vectorised loop over K counters writes). K = 64.

`philox_bits` here is the plain reference: int64 torch ops, products split in 16-bit halves so
that nothing overflows. It is what the C kernel is tested against, and what weight drop uses
where that kernel cannot be built (slowly, with the same masks).
"""

from __future__ import annotations

import torch
from torch import Tensor

K = 64  # counters per block (the C kernel's WD_K)
ROUNDS = 10
M0, M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # key increments (the golden ratio, sqrt(3) - 1)
MASK32 = 0xFFFFFFFF


def _mul32(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of a * m for a in [0, 2**32) (int64) and a 32-bit constant m."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    lo_part = a * m_lo  # < 2**48
    hi_part = a * m_hi  # < 2**48
    # a * m = hi_part * 2**16 + lo_part
    mid = hi_part + (lo_part >> 16)  # < 2**49
    hi = mid >> 16
    lo = ((mid & 0xFFFF) << 16) | (lo_part & 0xFFFF)
    return hi & MASK32, lo


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int,
               k1: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 of counters (c0, c1, c2, c3) (int64 tensors in [0, 2**32)) under key
    (k0, k1): the four output words, int64 in [0, 2**32)."""
    for _ in range(ROUNDS):
        hi0, lo0 = _mul32(c0, M0)
        hi1, lo1 = _mul32(c2, M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return c0, c1, c2, c3


def philox_bits(n: int, seed: int) -> Tensor:
    """The 32-bit draw of each of n elements (int64 in [0, 2**32)), in the layout above."""
    blocks = -(-n // (4 * K))
    n_ = torch.arange(blocks * K, dtype=torch.int64)
    zero = torch.zeros_like(n_)
    words = torch.stack(philox4x32(n_ & MASK32, n_ >> 32, zero, zero, seed & MASK32,
                                   (seed >> 32) & MASK32))  # [4, blocks * K]
    # element order: block, then output word, then k
    flat = words.view(4, blocks, K).transpose(0, 1).reshape(-1)
    return flat[:n]


def threshold(keep: float) -> int:
    """The 32-bit threshold t with P(draw < t) = t / 2**32 nearest keep (keep in (0, 1])."""
    return min(max(round(keep * 2**32), 1), 2**32 - 1)
