"""AWD-LSTM's dropouts: embedding (word-type) dropout, locked (variational) dropout, weight drop.

Masks come from torch's default generator (the trainer seeds it per rank and checkpoints it).
Semantics follow salesforce/awd-lstm-lm (embed_regularize.py, locked_dropout.py, weight_drop.py),
but none of them copies a weight matrix or re-registers a parameter.

The big masks (weight drop on the recurrent/gate matrices, QRNN zoneout) are drawn on CPU by
`keep_mask`: 31 random bits per element compared with a threshold. torch's CPU `bernoulli_`
costs ~11 ns per element, which made weight drop ~20% of a PTB QRNN training step (four masks of
up to 4650 x 1550 per step); the integer draw plus compare costs ~3 ns. Other devices use
torch's fused dropout kernels.
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
    """
    if not training or p == 0.0:
        return weight
    if weight.device.type != "cpu":
        return F.dropout(weight, p=p, training=True)
    # one float mask holding 0 or 1/(1-p): the forward and the gradient are one multiply each
    # (a bool mask would be converted to float in both, and the scale be a pass of its own)
    mask = keep_mask(weight.shape, 1 - p).to(weight.dtype).mul_(1 / (1 - p))
    return weight * mask


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
