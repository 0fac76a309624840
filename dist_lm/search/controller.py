"""The ENAS controller: an LSTM that writes a cell one decision at a time.

For node 1 it picks an activation; for node l >= 2 first the node it reads (attention over the
controller's outputs at the earlier nodes, the "anchors"), then its activation. Each decision's
logits are divided by the temperature and squashed to tanh_constant * tanh(.) (the paper's 5.0
and 2.5 for the recurrent cell). `sample` draws a cell from a torch.Generator (so the search can
checkpoint it) and returns its log-probability and the sum of the per-decision entropies, both
differentiable; `score(genotype)` gives the same two for a given cell (teacher forcing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.cell import ACTIVATIONS, Genotype


class Controller(nn.Module):
    def __init__(self, n_nodes: int, hidden: int = 100, temperature: float = 5.0,
                 tanh_constant: float = 2.5):
        super().__init__()
        self.n_nodes, self.hidden = n_nodes, hidden
        self.temperature, self.tanh_constant = temperature, tanh_constant
        self.start = nn.Parameter(torch.empty(1, hidden))          # the first input
        self.act_emb = nn.Embedding(len(ACTIVATIONS), hidden)      # input after an activation
        self.lstm = nn.LSTMCell(hidden, hidden)
        self.act_head = nn.Linear(hidden, len(ACTIVATIONS))
        self.attn_anchor = nn.Linear(hidden, hidden, bias=False)   # attention over anchors
        self.attn_query = nn.Linear(hidden, hidden, bias=False)
        self.attn_v = nn.Linear(hidden, 1, bias=False)
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)

    def _squash(self, logits: Tensor) -> Tensor:
        if self.temperature:
            logits = logits / self.temperature
        if self.tanh_constant:
            logits = self.tanh_constant * torch.tanh(logits)
        return logits

    def decisions(self, genotype: Genotype | None = None,
                  generator: torch.Generator | None = None):
        """Walk the decisions, sampling (genotype None) or following `genotype`; returns the
        genotype and the list of (log-softmax [k], chosen index) per decision."""
        state = None
        inp = self.start
        anchors, keys = [], []
        acts, preds, steps = [], [], []

        def choose(logp: Tensor, forced: int | None) -> int:
            if forced is None:
                forced = int(torch.multinomial(logp.exp(), 1, generator=generator))
            steps.append((logp, forced))
            return forced

        for l in range(1, self.n_nodes + 1):
            if l == 1:
                preds.append(0)
            else:
                state = self.lstm(inp, state)
                query = self.attn_query(state[0])                        # [1, h]
                scores = self.attn_v(torch.tanh(torch.cat(keys) + query)).view(-1)
                j = choose(F.log_softmax(self._squash(scores), -1),
                           None if genotype is None else genotype.preds[l - 1] - 1)
                preds.append(j + 1)
                inp = anchors[j]
            state = self.lstm(inp, state)
            logits = self.act_head(state[0]).view(-1)
            a = choose(F.log_softmax(self._squash(logits), -1),
                       None if genotype is None else ACTIVATIONS.index(genotype.acts[l - 1]))
            acts.append(ACTIVATIONS[a])
            anchors.append(state[0])
            keys.append(self.attn_anchor(state[0]))
            inp = self.act_emb.weight[a:a + 1]
        return Genotype(tuple(acts), tuple(preds)), steps

    @staticmethod
    def _totals(steps) -> tuple[Tensor, Tensor]:
        log_prob = sum(logp[i] for logp, i in steps)
        entropy = sum(-(logp.exp() * logp).sum() for logp, _ in steps)
        return log_prob, entropy

    def sample(self, generator: torch.Generator | None = None) -> tuple[Genotype, Tensor, Tensor]:
        """A cell, its log-probability and its entropy (sum over its decisions)."""
        g, steps = self.decisions(generator=generator)
        return (g, *self._totals(steps))

    def score(self, genotype: Genotype) -> tuple[Tensor, Tensor]:
        """log p(genotype) and the entropy along its decisions."""
        if genotype.n_nodes != self.n_nodes:
            raise ValueError(f"genotype has {genotype.n_nodes} nodes, controller {self.n_nodes}")
        _, steps = self.decisions(genotype=genotype)
        return self._totals(steps)
