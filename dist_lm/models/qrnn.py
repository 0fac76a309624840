"""One QRNN layer (Bradbury et al.; salesforce/pytorch-qrnn's QRNNLayer with output gate).

One matmul computes the gates of all timesteps from the window of inputs (x_t alone, or
[x_t, x_{t-1}] for window 2), then one fused op (dist_lm.kernels.qrnn_fused: Triton on CUDA, a C
kernel on CPU, the unfused torch sequence as reference and fallback) computes
    z = tanh(.), f = sigmoid(.) (zoneout optional), o = sigmoid(.)
    c_t = f_t z_t + (1 - f_t) c_{t-1}
    h_t = o_t c_t
DropConnect `wdrop` applies to the whole gate matrix, as the reference wraps `linear` in
WeightDrop. The hidden state is (c [1, b, H],) or, for window 2, (c, x_prev [1, b, input_size]):
the previous window's last input travels in the hidden state rather than in module state, so
streams, micro-batch splits and checkpoints stay exact; zeros (init_hidden) reproduce the
reference's first window. c is the fused op's carry c_last, fp32 whatever the activation dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.qrnn_fused import qrnn_fused
from .dropout import keep_mask, weight_drop


class QRNNLayer(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, window: int = 1, zoneout: float = 0.0,
                 wdrop: float = 0.0):
        super().__init__()
        if window not in (1, 2):
            raise ValueError(f"QRNN window must be 1 or 2, got {window}")
        self.input_size, self.hidden_size, self.window = input_size, hidden_size, window
        self.zoneout, self.wdrop = zoneout, wdrop
        self.weight_raw = nn.Parameter(torch.empty(3 * hidden_size, window * input_size))
        self.bias = nn.Parameter(torch.empty(3 * hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's init (the reference's gate matrix is an nn.Linear)
        nn.init.kaiming_uniform_(self.weight_raw, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.weight_raw.size(1))
        nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, window={self.window}, "
                f"zoneout={self.zoneout}, wdrop={self.wdrop}")

    def init_hidden(self, b: int, device=None, dtype=None) -> tuple[Tensor, ...]:
        p = self.weight_raw
        kw = {"device": device or p.device, "dtype": dtype or p.dtype}
        c = torch.zeros(1, b, self.hidden_size, **kw)
        return (c, torch.zeros(1, b, self.input_size, **kw)) if self.window == 2 else (c,)

    def _zoneout(self, y: Tensor) -> tuple[Tensor | None, float]:
        """The zoneout (mask, scale) on f, as dropout.zoneout_mask applies it: training keeps f
        with probability 1-p (the same draw from the same generator: keep_mask on CPU,
        bernoulli_ of a tensor of y's dtype elsewhere), eval scales it by 1-p."""
        p = self.zoneout
        if p == 0.0:
            return None, 1.0
        if not self.training:
            return None, 1.0 - p
        shape = (y.size(0), y.size(1), self.hidden_size)
        if y.device.type != "cpu":
            return y.new_empty(shape).bernoulli_(1 - p), 1.0
        return keep_mask(shape, 1 - p), 1.0

    def forward(self, x: Tensor, hidden: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        if self.window == 2:
            prev = hidden[1].to(x.dtype)
            source = torch.cat([x, torch.cat([prev, x[:-1]], 0)], 2)  # [x_t, x_{t-1}]
        else:
            source = x
        w = weight_drop(self.weight_raw, self.wdrop, self.training)
        y = F.linear(source, w, self.bias)  # [T, b, 3H]: z | f | o pre-activations
        mask, scale = self._zoneout(y)
        h, c_last = qrnn_fused(y, hidden[0][0], mask, scale)  # c_last: [b, H], fp32
        c = c_last.unsqueeze(0)
        new_hidden = (c,) if self.window == 1 else (c, x[-1:])
        return h, new_hidden
