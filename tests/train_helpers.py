"""Stand-ins for the data and model contracts (docs/internals.md) used by the trainer tests.

TinyLM follows the RNNLanguageModel contract (init_hidden, forward -> nll/hidden/output/
raw_output/ar/tar, locked dropout drawn from torch's default generator); ListLoader follows
the StreamLoader contract (B contiguous streams, rank columns, variable BPTT from a numpy
Generator seeded identically on every rank, exact state_dict). They keep the engine, resume
and equality tests independent of the data/model packages and fast on 2 cores.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

VOCAB = 50


def corpus(split: str) -> torch.Tensor:
    g = np.random.default_rng({"train": 1, "valid": 2, "test": 3}[split])
    n = {"train": 6000, "valid": 1200, "test": 800}[split]
    # a learnable pattern: a noisy random walk over the vocabulary
    steps = g.integers(-2, 3, size=n)
    return torch.from_numpy(np.cumsum(steps) % VOCAB).long()


class ListLoader:
    def __init__(self, split, batch_size, rank=0, world_size=1, bptt=70, variable_bptt=False,
                 seed=0, max_seq_len=0, device="cpu"):
        data = corpus(split)
        assert batch_size % world_size == 0
        b = batch_size // world_size
        L = data.numel() // batch_size
        cols = data[: L * batch_size].view(batch_size, L).t().contiguous()  # [L, B]
        self.data = cols[:, rank * b:(rank + 1) * b].to(device)
        self.stream_len = L
        self.tokens_per_epoch = (L - 1) * b
        self.bptt, self.variable, self.max_seq_len = bptt, variable_bptt, max_seq_len
        self.gen = np.random.default_rng(seed)
        self.epoch, self.pos = 0, 0
        self.lengths = []  # every window drawn (the tests compare them across ranks)

    def _window(self) -> int:
        if not self.variable:
            return self.bptt
        base = self.bptt if self.gen.random() < 0.95 else self.bptt / 2
        n = max(5, int(self.gen.normal(base, 5)))
        return min(n, self.max_seq_len) if self.max_seq_len > 0 else n

    def __iter__(self):
        L = self.data.shape[0]
        while self.pos < L - 1:
            n = min(self._window(), L - 1 - self.pos)
            i = self.pos
            self.pos += n
            self.lengths.append(n)
            yield self.data[i:i + n], self.data[i + 1:i + 1 + n]
        self.epoch += 1
        self.pos = 0

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos,
                "gen": repr(self.gen.bit_generator.state)}

    def load_state_dict(self, sd):
        self.epoch, self.pos = sd["epoch"], sd["pos"]
        self.gen.bit_generator.state = eval(sd["gen"])  # test helper only


def loader_fn(split, batch_size, rank, world_size, bptt, variable_bptt, seed, max_seq_len, device):
    return ListLoader(split, batch_size, rank, world_size, bptt, variable_bptt, seed, max_seq_len,
                      device)


@dataclass
class Out:
    nll: torch.Tensor
    hidden: tuple
    output: torch.Tensor
    raw_output: torch.Tensor
    ar: torch.Tensor
    tar: torch.Tensor


def _locked(x, p, training):
    if not training or p == 0:
        return x
    mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - p) / (1 - p)
    return x * mask


class TinyLM(nn.Module):
    def __init__(self, mcfg, vocab_size):
        super().__init__()
        self.cfg = mcfg
        self.emb = nn.Embedding(vocab_size, mcfg.emb_size)
        self.rnn = nn.LSTM(mcfg.emb_size, mcfg.emb_size)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def init_hidden(self, b):
        w = self.emb.weight
        return (w.new_zeros(1, b, self.cfg.emb_size), w.new_zeros(1, b, self.cfg.emb_size))

    def forward(self, inputs, hidden, targets=None):
        x = _locked(self.emb(inputs), self.cfg.dropouti, self.training)
        raw, h = self.rnn(x, hidden)
        out = _locked(raw, self.cfg.dropout, self.training)
        logits = out @ self.emb.weight.t() + self.bias  # tied head
        nll = None
        if targets is not None:
            nll = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                              reduction="none").view_as(targets)
        zero = logits.new_zeros(())
        ar = self.cfg.ar * out.pow(2).mean() if self.training else zero
        tar = self.cfg.tar * (raw[1:] - raw[:-1]).pow(2).mean() if self.training else zero
        return Out(nll, h, out, raw, ar, tar)


def model_fn(mcfg, vocab_size):
    return TinyLM(mcfg, vocab_size)


def tiny_config(run_dir, **over):
    from dist_lm.config import load_config

    base = {"model.emb_size": 16, "model.dropout": 0.0, "model.dropouti": 0.0,
            "model.dropouth": 0.0, "model.dropoute": 0.0, "model.wdrop": 0.0,
            "train.global_batch": 4, "train.bptt": 12, "train.max_steps": 8,
            "train.seed": 141, "train.device": "cpu", "data.eval_batch_size": 2,
            "data.test_batch_size": 2, "log.every_steps": 1, "log.progress": False,
            "log.wandb_mode": "disabled", "checkpoint.every_steps": 0,
            "train.run_dir": str(run_dir), "optim.lr": 1.0}
    base.update(over)
    return load_config(None, base)


def make_trainer(cfg):
    from dist_lm.train.trainer import Trainer

    return Trainer(cfg, model_fn=model_fn, loader_fn=loader_fn, vocab_size=VOCAB,
                   tokenizer_kind="word")


def main(argv):
    """Entry point for subprocess/torchrun runs: python tests/train_helpers.py OUT key=value..."""
    torch.set_num_threads(1)
    out = argv[0]
    over = {}
    for kv in argv[1:]:
        k, v = kv.split("=", 1)
        over[k] = v
    resume = over.pop("resume", None)
    cfg = tiny_config(over.pop("train.run_dir"), **over)
    tr = make_trainer(cfg)
    tr.fit(resume=resume)
    rank = tr.rank
    torch.save({"params": {k: v.detach().clone() for k, v in tr.module.state_dict().items()},
                "lengths": list(tr.train_loader.lengths)}, f"{out}.rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:])
