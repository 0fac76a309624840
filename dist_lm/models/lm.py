"""RNNLanguageModel: embedding -> stack of LSTM/QRNN/GRU layers -> head, with AWD-LSTM's regularizers.

    model = build_model(cfg.model, vocab_size)
    hidden = model.init_hidden(b)
    out = model(inputs, hidden, targets)          # inputs/targets int64 [T, b]
    loss = out.nll.mean() + out.ar + out.tar
    hidden = detach_hidden(out.hidden)

The layer sizes, dropouts and AR/TAR follow salesforce/awd-lstm-lm's model.py: embedding
dropout (dropoute) on word types, locked dropout on the embedding output (dropouti), between
layers (dropouth) and on the last output (dropout); AR on the dropped last output, TAR on its
raw output. Everything is off in eval mode, where ar and tar are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from .dropout import embedded_dropout, locked_dropout
from .heads import (AdaptiveHead, HierarchicalHead, MoSHead, SoftmaxHead, auto_cutoffs,
                    cutoffs_valid, default_classes)
from .lstm import WeightDropRNN
from .qrnn import QRNNLayer


@dataclass
class LMOutput:
    nll: Tensor | None         # [T, b] float32, None without targets
    hidden: list               # per layer a tuple of [1, b, *] tensors (not detached)
    output: Tensor             # [T, b, d] last-layer output after the output dropout (head input)
    raw_output: Tensor         # [T, b, d] last-layer output before dropout
    ar: Tensor                 # scalar, weighted by alpha; 0 in eval
    tar: Tensor                # scalar, weighted by beta; 0 in eval


def detach_hidden(hidden: Any) -> Any:
    """Detach every tensor of a nested tuple/list hidden state (between BPTT windows)."""
    if isinstance(hidden, Tensor):
        return hidden.detach()
    return type(hidden)(detach_hidden(h) for h in hidden)


def _batch_size(hidden: Any) -> int:
    while not isinstance(hidden, Tensor):
        hidden = hidden[0]
    return hidden.size(1)


class RNNLanguageModel(nn.Module):
    def __init__(self, vocab_size: int, arch: str = "lstm", emb_size: int = 400,
                 hidden_size: int = 1150, n_layers: int = 3, tie_weights: bool = True,
                 dropout: float = 0.4, dropouth: float = 0.25, dropouti: float = 0.4,
                 dropoute: float = 0.1, wdrop: float = 0.5, ar: float = 2.0, tar: float = 1.0,
                 head: str = "softmax", cutoffs: list[int] | None = None, n_experts: int = 15,
                 mos_latent: int = 0, dropoutl: float = 0.29, qrnn_window: int = 2,
                 zoneout: float = 0.0):
        super().__init__()
        self.vocab_size, self.arch, self.tie_weights = vocab_size, arch, tie_weights
        self.dropout, self.dropouth, self.dropouti, self.dropoute = dropout, dropouth, dropouti, dropoute
        self.alpha, self.beta = ar, tar
        self.encoder = nn.Embedding(vocab_size, emb_size)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        last = emb_size if tie_weights else hidden_size
        sizes = [emb_size] + [hidden_size] * (n_layers - 1) + [last]
        self.layer_sizes = sizes[1:]
        layers = []
        for i in range(n_layers):
            if arch == "qrnn":
                layers.append(QRNNLayer(sizes[i], sizes[i + 1], window=qrnn_window if i == 0 else 1,
                                        zoneout=zoneout, wdrop=wdrop))
            else:
                layers.append(WeightDropRNN(sizes[i], sizes[i + 1], wdrop=wdrop, mode=arch.upper()))
        self.rnns = nn.ModuleList(layers)
        if head == "softmax":
            self.head = SoftmaxHead(last, vocab_size, tie_weights)
        elif head == "adaptive":
            self.head = AdaptiveHead(last, vocab_size, list(cutoffs or auto_cutoffs(vocab_size)),
                                     tie_weights)
        elif head == "mos":
            self.head = MoSHead(last, vocab_size, n_experts, mos_latent or emb_size, tie_weights,
                                dropoutl)
        else:
            raise ValueError(f"unknown head {head!r}")

    def _tied(self) -> Tensor | None:
        return self.encoder.weight if self.tie_weights else None

    def init_hidden(self, b: int) -> list[tuple[Tensor, ...]]:
        return [rnn.init_hidden(b) for rnn in self.rnns]

    def forward(self, inputs: Tensor, hidden: Any = None, targets: Tensor | None = None) -> LMOutput:
        T, b = inputs.shape
        if hidden is None or _batch_size(hidden) != b:
            hidden = self.init_hidden(b)  # a new batch size starts fresh streams
        plan = self.head.prepare(targets)  # before the layers are queued (see AdaptiveHead)
        x = embedded_dropout(self.encoder.weight, inputs, self.dropoute, self.training)
        x = locked_dropout(x, self.dropouti, self.training)
        new_hidden = []
        for i, rnn in enumerate(self.rnns):
            x, h = rnn(x, hidden[i])
            new_hidden.append(h)
            if i < len(self.rnns) - 1:
                x = locked_dropout(x, self.dropouth, self.training)
        raw = x
        output = locked_dropout(raw, self.dropout, self.training)
        zero = output.new_zeros((), dtype=torch.float32)
        ar = self.alpha * output.float().pow(2).mean() if self.training and self.alpha else zero
        tar = (self.beta * (raw[1:] - raw[:-1]).float().pow(2).mean()
               if self.training and self.beta and T > 1 else zero)
        nll = None if targets is None else self.head.nll(output, targets, self._tied(), plan)
        return LMOutput(nll=nll, hidden=new_hidden, output=output, raw_output=raw, ar=ar, tar=tar)

    def log_prob(self, output: Tensor) -> Tensor:
        """Full next-token log-distribution [..., V] for head inputs [..., d] (e.g. out.output)."""
        return self.head.log_prob(output, self._tied())


def build_model(cfg, vocab_size: int) -> RNNLanguageModel:
    """The model a ModelConfig describes (dist_lm.config.ModelConfig)."""
    if vocab_size < 2:
        raise UserError(f"vocabulary size {vocab_size} is too small for a language model; "
                        f"check the prepared corpus (vocab.json).")
    latent = cfg.mos_latent or cfg.emb_size
    if cfg.head == "mos" and cfg.tie_weights and latent != cfg.emb_size:
        raise UserError(f"model.mos_latent={cfg.mos_latent} must equal model.emb_size="
                        f"{cfg.emb_size} (or be 0) when model.tie_weights is true.")
    if cfg.head == "adaptive" and cfg.cutoffs:
        cuts = list(cfg.cutoffs)
        if not cutoffs_valid(cuts, vocab_size):
            raise UserError(f"model.cutoffs={cuts} must increase strictly and stay inside "
                            f"(0, {vocab_size}) (the vocabulary size); or leave it empty.")
    if cfg.head == "hierarchical" and not 0 <= cfg.hsm_classes <= vocab_size:
        raise UserError(f"model.hsm_classes={cfg.hsm_classes} must lie in [1, {vocab_size}] "
                        f"(the vocabulary size), or be 0 for about sqrt({vocab_size}).")
    hierarchical = cfg.head == "hierarchical"
    cell = cfg.arch == "cell"
    if cell:  # checked before anything is built: a bad genotype is one UserError
        from .cell import parse_genotype

        genotype = parse_genotype(cfg.cell)
    model = RNNLanguageModel(
        vocab_size, arch="gru" if cell else cfg.arch, emb_size=cfg.emb_size,
        hidden_size=cfg.hidden_size,
        n_layers=cfg.n_layers, tie_weights=cfg.tie_weights, dropout=cfg.dropout,
        dropouth=cfg.dropouth, dropouti=cfg.dropouti, dropoute=cfg.dropoute, wdrop=cfg.wdrop,
        ar=cfg.ar, tar=cfg.tar, head="softmax" if hierarchical else cfg.head,
        cutoffs=list(cfg.cutoffs), n_experts=cfg.n_experts, mos_latent=cfg.mos_latent,
        dropoutl=cfg.dropoutl, qrnn_window=cfg.qrnn_window, zoneout=cfg.zoneout)
    if cell:  # the same stack with cell layers in place of the (placeholder) GRU layers
        from .cell import cell_layers

        model.arch = "cell"
        model.rnns = cell_layers([cfg.emb_size] + model.layer_sizes, genotype, cfg.wdrop)
    if hierarchical:  # built here, in place of the softmax head (same input size and tying)
        n_classes = cfg.hsm_classes or default_classes(vocab_size)
        model.head = HierarchicalHead(model.layer_sizes[-1], vocab_size, n_classes,
                                      cfg.tie_weights)
    return model
