"""A searched recurrent cell (ENAS, Pham et al. 2018): genotypes and the cell layer.

A cell has N nodes. Node 1 reads the cell input, [x_t, h_{t-1}]; node l >= 2 reads one earlier
node j (1 <= j < l). Every node has one activation from {tanh, relu, identity, sigmoid} and a
highway gate:

    node 1:  c = sigmoid(x W_xc + h_{t-1} W_hc)   h_1 = c * act(x W_xh + h_{t-1} W_hh) + (1 - c) * h_{t-1}
    node l:  c = sigmoid(h_j W_c)                 h_l = c * act(h_j W_h) + (1 - c) * h_j

and the cell output h_t (also the carried state) is the mean of the loose ends: the nodes no
other node reads. There are no biases (as in the paper).

A genotype is written as one token per node, `ACT:PRED`, separated by spaces (or commas):

    "tanh:0 relu:1 relu:1 identity:2 tanh:2 sigmoid:5"

PRED is the node read (0 is the cell input, which only node 1 reads; node 1 may be written
without ":0"). `parse_genotype` accepts that form and `str(genotype)` writes it back.

`CellLayer` runs one such cell over [T, b, input_size] with the hidden state `(h [1, b, H],)`
(the LSTM layers' interface: init_hidden, carried, detached by the caller). DropConnect
(`wdrop`) drops the recurrent matrices: node 1's h_{t-1} matrix and every node's matrix (all of
them act on functions of h_{t-1}), one mask per forward, shared by every timestep, as AWD-LSTM's
weight drop. With `shared=True` the layer is a supernet layer: it holds one matrix per (node,
predecessor) pair, and `set_genotype` picks which cell the next forward runs (ENAS's shared
weights); a fixed layer holds one matrix per node.

The time loop is one autograd Function (`_CellRecurrence`) with a hand-written backward: no
per-op autograd records inside the loop, and each weight gradient is one matmul over all
timesteps (tests/models/test_models_cell.py checks values and gradients against a plain per-timestep
implementation).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .dropout import weight_drop

ACTIVATIONS = ("tanh", "relu", "identity", "sigmoid")
_ALIASES = {"id": "identity", "linear": "identity", "sig": "sigmoid", "relu": "relu",
            "tanh": "tanh", "identity": "identity", "sigmoid": "sigmoid"}
_EXAMPLE = "tanh:0 relu:1 relu:1 identity:2"


def activation(name: str, x: Tensor) -> Tensor:
    if name == "tanh":
        return torch.tanh(x)
    if name == "relu":
        return torch.relu(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    return x


@dataclass(frozen=True)
class Genotype:
    """acts[i] and preds[i] are node i+1's activation and the node it reads (preds[0] == 0)."""

    acts: tuple[str, ...]
    preds: tuple[int, ...]

    @property
    def n_nodes(self) -> int:
        return len(self.acts)

    def loose_ends(self) -> list[int]:
        """The 1-based nodes no other node reads, in order (the last node is always one)."""
        used = set(self.preds[1:])
        return [i for i in range(1, self.n_nodes + 1) if i not in used]

    def __str__(self) -> str:
        return " ".join(f"{a}:{p}" for a, p in zip(self.acts, self.preds))


def parse_genotype(text: str, n_nodes: int = 0, key: str = "model.cell") -> Genotype:
    """A Genotype from its string form; a bad string is one UserError naming the problem."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{key} is empty; model.arch=cell needs a cell genotype such as "
                        f"\"{_EXAMPLE}\" (one ACT:PRED per node, docs/search.md), e.g. the "
                        f"cell.toml a `dist-lm search` run writes.")
    tokens = [t for t in re.split(r"[\s,]+", text.strip()) if t]
    acts, preds = [], []
    for i, tok in enumerate(tokens, start=1):
        name, sep, pred = tok.partition(":")
        act = _ALIASES.get(name.lower())
        if act is None:
            raise UserError(f"{key}: node {i} ('{tok}') has unknown activation '{name}'; "
                            f"use one of {', '.join(ACTIVATIONS)} (e.g. \"{_EXAMPLE}\").")
        if i == 1 and not sep:
            pred = "0"
        if not pred.isdigit():
            raise UserError(f"{key}: node {i} ('{tok}') must be written ACT:PRED with PRED the "
                            f"number of the node it reads (e.g. \"{_EXAMPLE}\").")
        j = int(pred)
        if i == 1 and j != 0:
            raise UserError(f"{key}: node 1 ('{tok}') reads the cell input, written 0 "
                            f"(e.g. '{name}:0').")
        if i > 1 and not 1 <= j < i:
            raise UserError(f"{key}: node {i} ('{tok}') reads node {j}, but node {i} can only "
                            f"read an earlier node, 1..{i - 1}.")
        acts.append(act)
        preds.append(j)
    if n_nodes and len(acts) != n_nodes:
        raise UserError(f"{key} has {len(acts)} nodes; this search uses {n_nodes} "
                        f"(search.n_nodes).")
    return Genotype(tuple(acts), tuple(preds))


def uniform_genotype(n_nodes: int, generator: torch.Generator | None = None) -> Genotype:
    """A cell drawn uniformly from the space (random-search baseline): each node's
    predecessor and activation uniformly and independently."""
    acts, preds = [], []
    for i in range(1, n_nodes + 1):
        preds.append(0 if i == 1 else int(torch.randint(1, i, (1,), generator=generator)))
        acts.append(ACTIVATIONS[int(torch.randint(len(ACTIVATIONS), (1,), generator=generator))])
    return Genotype(tuple(acts), tuple(preds))


class CellLayer(nn.Module):
    """One recurrent layer of a cell over [T, b, input_size]; hidden (h [1, b, H],)."""

    def __init__(self, input_size: int, hidden_size: int, genotype: Genotype | None = None,
                 wdrop: float = 0.0, n_nodes: int = 0, shared: bool = False):
        super().__init__()
        n = n_nodes or (genotype.n_nodes if genotype is not None else 0)
        if n < 1:
            raise ValueError("a cell needs at least one node (n_nodes or a genotype)")
        if genotype is not None and genotype.n_nodes != n:
            raise ValueError(f"genotype has {genotype.n_nodes} nodes, layer {n}")
        if genotype is None and not shared:
            raise ValueError("a fixed cell layer needs its genotype")
        self.input_size, self.hidden_size, self.n_nodes = input_size, hidden_size, n
        self.wdrop, self.shared, self.genotype = wdrop, shared, genotype
        H2 = 2 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(H2, input_size))   # node 1, x part: c | h
        self.weight_hh = nn.Parameter(torch.empty(H2, hidden_size))  # node 1, h_{t-1} part
        if shared:  # node l (2..N): one [2H, H] matrix per predecessor 1..l-1
            self.node_weights = nn.ParameterList(
                [nn.Parameter(torch.empty(l - 1, H2, hidden_size)) for l in range(2, n + 1)])
        else:       # one [2H, H] matrix per node 2..N
            self.weight_nodes = nn.Parameter(torch.empty(max(0, n - 1), H2, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for w in self.parameters():
            nn.init.uniform_(w, -bound, bound)

    def extra_repr(self) -> str:
        cell = "shared" if self.shared else f"'{self.genotype}'"
        return (f"{self.input_size}, {self.hidden_size}, nodes={self.n_nodes}, cell={cell}, "
                f"wdrop={self.wdrop}")

    def set_genotype(self, genotype: Genotype) -> None:
        if genotype.n_nodes != self.n_nodes:
            raise ValueError(f"genotype has {genotype.n_nodes} nodes, layer {self.n_nodes}")
        if not self.shared and genotype != self.genotype:
            raise ValueError("a fixed cell layer runs its own genotype only")
        self.genotype = genotype

    def init_hidden(self, b: int, device=None, dtype=None) -> tuple[Tensor]:
        p = self.weight_ih
        return (torch.zeros(1, b, self.hidden_size, device=device or p.device,
                            dtype=dtype or p.dtype),)

    def _node_stack(self, g: Genotype) -> Tensor:
        """Nodes 2..N's [2H, H] matrices as one [N-1, 2H, H] tensor (DropConnect applied)."""
        if not self.shared:
            return weight_drop(self.weight_nodes, self.wdrop, self.training)
        if self.n_nodes == 1:
            return self.weight_hh.new_zeros(0, 2 * self.hidden_size, self.hidden_size)
        return torch.stack([weight_drop(self.node_weights[l - 2][g.preds[l - 1] - 1], self.wdrop,
                                        self.training) for l in range(2, self.n_nodes + 1)])

    def forward(self, x: Tensor, hidden: tuple[Tensor]) -> tuple[Tensor, tuple[Tensor]]:
        """fp32 outside any autocast (as the LSTM layers: the carry stays fp32); the output in
        the input's dtype."""
        low = self.weight_ih.dtype in (torch.float16, torch.bfloat16)  # e.g. DeepSpeed bf16
        if not (low or torch.is_autocast_enabled(x.device.type)):
            return self._run(x, hidden[0][0], cast=False)
        with torch.autocast(x.device.type, enabled=False):
            out, h = self._run(x.float(), hidden[0][0].float(), cast=low)
        return out.to(x.dtype), h

    def _run(self, x: Tensor, h: Tensor, cast: bool) -> tuple[Tensor, tuple[Tensor]]:
        g = self.genotype
        if g is None:
            raise RuntimeError("shared cell layer has no genotype set (call set_genotype)")
        w_ih = self.weight_ih
        w_hh = weight_drop(self.weight_hh, self.wdrop, self.training)
        nodes = self._node_stack(g)
        if cast:
            w_ih, w_hh, nodes = w_ih.float(), w_hh.float(), nodes.float()
        xs = F.linear(x, w_ih)  # [T, b, 2H]: every timestep's input part at once
        out = _CellRecurrence.apply(xs, h, w_hh, nodes, g)
        return out, (out[-1:],)


def _act_grad(name: str, a: Tensor) -> Tensor | float:
    """d act / d pre-activation, from the activation's output."""
    if name == "tanh":
        return 1 - a * a
    if name == "sigmoid":
        return a * (1 - a)
    if name == "relu":
        return (a > 0).to(a.dtype)
    return 1.0


class _CellRecurrence(torch.autograd.Function):
    """The cell over T steps, with a hand-written backward: the time loop runs without autograd
    (a dozen small ops per node and step otherwise, each recorded), and each weight gradient is
    one matmul over all timesteps instead of one per step.

    xs [T, b, 2H] node 1's input part (x_t W_ih^T), h0 [b, H], w_hh [2H, H], nodes [N-1, 2H, H];
    returns the outputs [T, b, H] (the last one is the next hidden state). Each node keeps its
    gate c, its activation a and its state per step for the backward.
    """

    @staticmethod
    def forward(ctx, xs, h0, w_hh, nodes, g):
        T, b, H2 = xs.shape
        H, N = H2 // 2, g.n_nodes
        ends = g.loose_ends()
        C = xs.new_empty(T, N, b, H)
        A = xs.new_empty(T, N, b, H)
        S = xs.new_empty(T, N, b, H)
        out = xs.new_empty(T, b, H)
        h = h0
        for t in range(T):
            prev = h
            s = torch.addmm(xs[t], prev, w_hh.t())
            for l in range(1, N + 1):
                if l > 1:
                    prev = S[t, g.preds[l - 1] - 1]
                    s = prev @ nodes[l - 2].t()
                c = torch.sigmoid(s[:, :H], out=C[t, l - 1])
                a = activation(g.acts[l - 1], s[:, H:])
                A[t, l - 1] = a
                torch.lerp(prev, a, c, out=S[t, l - 1])  # prev + c (a - prev)
            h = S[t, ends[0] - 1] if len(ends) == 1 else S[t, [e - 1 for e in ends]].mean(0)
            out[t] = h
        ctx.g = g
        ctx.save_for_backward(h0, w_hh, nodes, C, A, S, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h0, w_hh, nodes, C, A, S, out = ctx.saved_tensors
        g = ctx.g
        T, N, b, H = S.shape
        ends = g.loose_ends()
        ds_all = grad_out.new_zeros(T, N, b, 2 * H)  # d pre-activations, per step and node
        dh = torch.zeros_like(h0)                      # from the step after
        grad_out = grad_out.contiguous()
        for t in range(T - 1, -1, -1):
            d_out = (grad_out[t] + dh) / len(ends)
            dstate: list = [None] * N
            for e in ends:
                dstate[e - 1] = d_out
            h_prev = h0 if t == 0 else out[t - 1]
            for l in range(N, 0, -1):
                gl = dstate[l - 1]
                if gl is None:
                    continue
                prev = h_prev if l == 1 else S[t, g.preds[l - 1] - 1]
                c, a = C[t, l - 1], A[t, l - 1]
                ds = ds_all[t, l - 1]
                torch.mul(gl * (a - prev), c * (1 - c), out=ds[:, :H])
                torch.mul(gl * c, _act_grad(g.acts[l - 1], a), out=ds[:, H:])
                w = w_hh if l == 1 else nodes[l - 2]
                dprev = torch.addmm(gl * (1 - c), ds, w)
                if l == 1:
                    dh = dprev
                else:
                    j = g.preds[l - 1] - 1
                    dstate[j] = dprev if dstate[j] is None else dstate[j] + dprev
        h_prev = torch.cat([h0.unsqueeze(0), out[:-1]])              # [T, b, H]
        d_xs = ds_all[:, 0]
        d_w_hh = d_xs.reshape(-1, 2 * H).t() @ h_prev.reshape(-1, H)
        d_nodes = torch.zeros_like(nodes)
        for l in range(2, N + 1):
            src = S[:, g.preds[l - 1] - 1].reshape(-1, H)
            d_nodes[l - 2] = ds_all[:, l - 1].reshape(-1, 2 * H).t() @ src
        return d_xs, dh, d_w_hh, d_nodes, None


def cell_layers(sizes: list[int], genotype: Genotype | None, wdrop: float, n_nodes: int = 0,
                shared: bool = False) -> nn.ModuleList:
    """A stack of cell layers: layer i maps sizes[i] -> sizes[i + 1]."""
    return nn.ModuleList([CellLayer(sizes[i], sizes[i + 1], genotype, wdrop=wdrop,
                                    n_nodes=n_nodes, shared=shared)
                          for i in range(len(sizes) - 1)])
