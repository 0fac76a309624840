"""One LSTM (or GRU) layer with DropConnect on the hidden-to-hidden matrix.

The layer owns the same four tensors an `nn.LSTM(num_layers=1)` owns, under nn.LSTM's names
(`weight_ih_l0`, `bias_ih_l0`, `bias_hh_l0`), except that the recurrent matrix is registered as
`weight_hh_l0_raw` (the reference AWD-LSTM's name). Each forward drops it functionally and calls
the very kernel `nn.LSTM` calls (`torch._VF.lstm`: cuDNN on GPU, the fused CPU kernel otherwise).
Nothing is deleted or re-assigned, so train/eval switches, `state_dict`, deepcopy, DDP and
DeepSpeed see plain parameters, each used once per forward.

On CUDA, cuDNN wants all four weights as views of one buffer in its own layout, else it warns
("RNN module weights are not part of single contiguous chunk of memory") and compacts them on
every call. Since the dropped matrix is new each step, a copy per step is unavoidable; we make
it ourselves, once, into exactly cuDNN's layout (probed from a flattened nn.LSTM of the same
shape), so cuDNN takes the fast path and never warns.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .dropout import weight_drop

_GATES = {"LSTM": 4, "GRU": 3}
_LAYOUTS: dict[tuple, tuple[list[int], int] | None] = {}  # (mode, in, H, device, dtype) -> offsets, size


def _cudnn_layout(mode: str, input_size: int, hidden_size: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[list[int], int] | None:
    """Element offsets of (w_ih, w_hh, b_ih, b_hh) in cuDNN's flat weight buffer, and its size."""
    key = (mode, input_size, hidden_size, str(device), dtype)
    if key not in _LAYOUTS:
        layout = None
        try:
            # the probe's init must not draw from the default generator: it runs at the first
            # forward of each process, so a resumed run would get other dropout masks afterwards
            with torch.random.fork_rng(devices=[]):
                probe = getattr(nn, mode)(input_size, hidden_size).to(device=device, dtype=dtype)
            probe.flatten_parameters()
            ws = probe._flat_weights
            base = ws[0].untyped_storage().data_ptr()
            if all(w.untyped_storage().data_ptr() == base for w in ws):
                size = ws[0].untyped_storage().nbytes() // ws[0].element_size()
                layout = ([(w.data_ptr() - base) // w.element_size() for w in ws], size)
            del probe
        except (RuntimeError, AttributeError):  # no cuDNN: fall back to the plain weight list
            layout = None
        _LAYOUTS[key] = layout
    return _LAYOUTS[key]


def _flat_weights(weights: list[Tensor], layout: tuple[list[int], int]) -> list[Tensor]:
    """Copy the weights (differentiably) into one new buffer in `layout`; return views of it."""
    offsets, size = layout
    order = sorted(range(len(weights)), key=lambda i: offsets[i])
    pieces, pos = [], 0
    for i in order:
        if offsets[i] > pos:  # alignment gap in cuDNN's buffer
            pieces.append(weights[i].new_zeros(offsets[i] - pos))
        pieces.append(weights[i].reshape(-1))
        pos = offsets[i] + weights[i].numel()
    if size > pos:
        pieces.append(weights[0].new_zeros(size - pos))
    flat = torch.cat(pieces)
    return [flat[offsets[i]:offsets[i] + w.numel()].view_as(w) for i, w in enumerate(weights)]


class WeightDropRNN(nn.Module):
    """A single-layer LSTM/GRU over [T, b, input_size] with DropConnect `wdrop` on weight_hh.

    hidden: (h, c) for LSTM, (h,) for GRU, each [1, b, hidden_size].
    """

    def __init__(self, input_size: int, hidden_size: int, wdrop: float = 0.0, mode: str = "LSTM"):
        super().__init__()
        if mode not in _GATES:
            raise ValueError(f"mode must be LSTM or GRU, got {mode!r}")
        self.mode, self.input_size, self.hidden_size, self.wdrop = mode, input_size, hidden_size, wdrop
        g = _GATES[mode] * hidden_size
        self.weight_ih_l0 = nn.Parameter(torch.empty(g, input_size))
        self.weight_hh_l0_raw = nn.Parameter(torch.empty(g, hidden_size))
        self.bias_ih_l0 = nn.Parameter(torch.empty(g))
        self.bias_hh_l0 = nn.Parameter(torch.empty(g))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)  # nn.LSTM's init
        for w in self.parameters():
            nn.init.uniform_(w, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.mode}({self.input_size}, {self.hidden_size}), wdrop={self.wdrop}"

    def init_hidden(self, b: int, device=None, dtype=None) -> tuple[Tensor, ...]:
        p = self.weight_ih_l0
        z = torch.zeros(1, b, self.hidden_size, device=device or p.device, dtype=dtype or p.dtype)
        return (z, z.clone()) if self.mode == "LSTM" else (z,)

    def forward(self, x: Tensor, hidden: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The layer picks its own precision: fp32, outside any autocast. CUDA's autocast
        wrapper for cuDNN RNNs casts to fp16 whatever dtype the autocast asked for (bf16
        included), with no loss scaling, and AWD-LSTM's small gradients underflow there; in
        fp32, cuDNN still runs the RNN's matmuls on tensor cores as TF32 (train.tf32)."""
        low = self.weight_ih_l0.dtype != torch.float32  # e.g. DeepSpeed's bf16 parameters
        if not (low or torch.is_autocast_enabled(x.device.type)):
            return self._run(x, hidden, cast=False)
        with torch.autocast(x.device.type, enabled=False):
            out, h = self._run(x.float(), tuple(v.float() for v in hidden), cast=low)
        return out.to(x.dtype), h  # the output in the input's dtype, the carry in fp32

    # torch.compile (train.compile) leaves the kernel call alone: traced, the cuDNN LSTM would be
    # unrolled per timestep, and each BPTT length would compile again
    @torch.compiler.disable
    def _run(self, x: Tensor, hidden: tuple[Tensor, ...],
             cast: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
        w_hh = weight_drop(self.weight_hh_l0_raw, self.wdrop, self.training)
        weights = [self.weight_ih_l0, w_hh, self.bias_ih_l0, self.bias_hh_l0]
        if cast:
            weights = [w.float() for w in weights]
        if x.is_cuda and torch.backends.cudnn.enabled:
            layout = _cudnn_layout(self.mode, self.input_size, self.hidden_size, x.device,
                                   weights[0].dtype)
            if layout is not None:
                weights = _flat_weights(weights, layout)
        if self.mode == "LSTM":
            out, h, c = torch._VF.lstm(x, hidden, weights, True, 1, 0.0, self.training, False, False)
            return out, (h, c)
        out, h = torch._VF.gru(x, hidden[0], weights, True, 1, 0.0, self.training, False, False)
        return out, (h,)
