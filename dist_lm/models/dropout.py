"""AWD-LSTM's dropouts: embedding (word-type) dropout, locked (variational) dropout, weight drop.

Masks come from torch's default generator (the trainer seeds it per rank and checkpoints it).
Semantics follow salesforce/awd-lstm-lm (embed_regularize.py, locked_dropout.py, weight_drop.py),
but none of them copies a weight matrix or re-registers a parameter.

The big masks are drawn on CPU without `bernoulli_` (~11 ns per element, which made weight drop
~20% of a PTB QRNN training step: four masks of up to 4650 x 1550 per step). Weight drop on the
recurrent/gate matrices uses counter-based Philox bits in one fused pass forward and one
backward (see weight_drop); QRNN zoneout uses `keep_mask`, 31 bits of torch's generator per
element compared with a threshold (~3 ns). Other devices use torch's fused dropout kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def embedded_dropout(weight: Tensor, words: Tensor, p: float, training: bool) -> Tensor:
    """Embedding lookup with whole word types dropped (rows of `weight` zeroed, survivors / (1-p)).

    The reference multiplies the whole V x d matrix by a (V, 1) mask each step; at WikiText-103's
    267k words that is a 400 MB copy per step. Here the same (V,) mask is drawn (same generator
    consumption as the reference) and only the rows of the tokens in the batch are scaled.
    """
    emb = F.embedding(words, weight)
    if not training or p == 0.0:
        return emb
    mask = weight.new_empty(weight.size(0)).bernoulli_(1 - p).div_(1 - p)
    return emb * mask[words].unsqueeze(-1)


def keep_mask(shape: tuple[int, ...] | torch.Size, keep: float) -> Tensor:
    """A bool CPU mask, each element independently True with probability `keep` (up to 2**-31).

    torch's int32 `random_()` is uniform on [0, 2**31) (a 32-bit draw reduced mod 2**31), so
    `bits < round(keep * 2**31)` is a Bernoulli(keep) draw with a probability exact to 2**-31.
    """
    threshold = min(round(keep * 2**31), 2**31 - 1)
    return torch.empty(shape, dtype=torch.int32).random_() < threshold


def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Variational dropout on [T, b, d]: one (1, b, d) mask shared by every timestep."""
    if not training or p == 0.0:
        return x
    mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - p).div_(1 - p)
    return x * mask


def weight_drop(weight: Tensor, p: float, training: bool) -> Tensor:
    """DropConnect: elementwise dropout on a weight matrix, computed functionally each forward.

    The registered parameter stays the raw weight, so eval/train switches, state_dict, deepcopy,
    DDP and DeepSpeed see one ordinary parameter (the reference's WeightDrop deletes and
    re-assigns parameters and breaks on modern PyTorch).

    On CPU the mask is Philox4x32-10 bits keyed by one 63-bit seed drawn from torch's default
    generator (kernels/philox.py): the forward and the backward are one pass each (the C kernel
    of kernels/weight_drop_cpu.py: draw, compare, scale and multiply together) and no mask is
    stored.
    Other devices use torch's fused dropout kernel.
    """
    if not training or p == 0.0:
        return weight
    if weight.device.type != "cpu":
        return F.dropout(weight, p=p, training=True)
    seed = int(torch.empty((), dtype=torch.int64).random_())
    if weight.dtype != torch.float32:  # the kernel is fp32; the product rounds to the dtype
        return _PhiloxDrop.apply(weight.float(), seed, 1.0 - p).to(weight.dtype)
    return _PhiloxDrop.apply(weight, seed, 1.0 - p)


def philox_drop_reference(x: Tensor, seed: int, keep: float) -> Tensor:
    """weight_drop's CPU op in plain torch: x / keep where the Philox draw is below the
    threshold, else 0 (for tests, and where the C kernel cannot be built)."""
    from ..kernels.philox import philox_bits, threshold

    kept = philox_bits(x.numel(), seed).view(x.shape) < threshold(keep)
    return torch.where(kept, x * (1.0 / keep), torch.zeros((), dtype=x.dtype))


class _PhiloxDrop(torch.autograd.Function):
    """x -> x / keep where the seed's Philox draw keeps the element, else 0; the backward is
    the same op on the gradient (the mask is recomputed, not saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, seed: int, keep: float) -> Tensor:
        ctx.seed, ctx.keep = seed, keep
        return _philox_drop(x, seed, keep)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _philox_drop(g, ctx.seed, ctx.keep), None, None


def _philox_drop(x: Tensor, seed: int, keep: float) -> Tensor:
    from ..kernels import weight_drop_cpu
    from ..kernels.philox import threshold

    if weight_drop_cpu.library() is None:
        return philox_drop_reference(x, seed, keep)
    return weight_drop_cpu.weight_drop(x, seed, threshold(keep), 1.0 / keep)


def zoneout_mask(f: Tensor, p: float, training: bool) -> Tensor:
    """QRNN zoneout on the forget gate: training keeps f with prob 1-p (else 0: copy the old
    state); eval scales f by 1-p (the reference's expectation)."""
    if p == 0.0:
        return f
    if not training:
        return f * (1 - p)
    if f.device.type != "cpu":
        return f * torch.empty_like(f).bernoulli_(1 - p)
    return f * keep_mask(f.shape, 1 - p).to(f.dtype)
