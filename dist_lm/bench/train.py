"""`dist-lm bench train`: single-device training-step throughput (tokens/s).

The step is the Trainer's (local engine): forward on a [bptt, batch] window with the hidden
state carried, loss = nll + AR + TAR, backward, clip over all parameters, SGD step. Synthetic
tokens (speed does not depend on the text). The full-size figure is also recorded as the
single-device baseline for its model, vocabulary, batch, bptt and dtype
(dist_lm.metrics.baselines), which multi-rank runs of that configuration use for their
scaling efficiency.
"""

from __future__ import annotations

import time

import torch

from ..config import Config, to_dict
from ..metrics.baselines import baseline_key, record_baseline


def _config(quick: bool) -> Config:
    cfg = Config()  # the PTB small AWD-LSTM of configs/ptb_small_cpu.toml
    cfg.model.emb_size, cfg.model.hidden_size, cfg.model.n_layers = 200, 400, 3
    cfg.train.global_batch, cfg.train.bptt = 20, 70
    if quick:
        cfg.model.emb_size, cfg.model.hidden_size, cfg.model.n_layers = 32, 64, 2
        cfg.train.bptt = 20
    return cfg


def measure(cfg: Config, vocab: int, steps: int, warmup: int = 2) -> float:
    from ..models import build_model, detach_hidden
    from ..train.engines import LocalEngine

    torch.manual_seed(0)
    model = build_model(cfg.model, vocab)
    engine = LocalEngine(model, cfg, accum=1)
    B, T = cfg.train.global_batch, cfg.train.bptt
    data = torch.randint(0, vocab, (T + 1, B))
    hidden = model.init_hidden(B)
    model.train()
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        out = model(data[:-1], hidden, data[1:])
        engine.backward(out.nll.mean() + out.ar + out.tar, last=True)
        engine.step(cfg.optim.clip)
        hidden = detach_hidden(out.hidden)
    return steps * T * B / (time.perf_counter() - t0)


def run(quick: bool) -> list[dict]:
    cfg = _config(quick)
    vocab = 1000 if quick else 10000
    tps = measure(cfg, vocab, steps=3 if quick else 20)
    m = cfg.model
    if not quick:
        key = baseline_key(to_dict(cfg)["model"], vocab, cfg.train.global_batch, cfg.train.bptt,
                           "fp32", "cpu")
        record_baseline(key, tps, "dist-lm bench train")
    return [{"name": f"train step lstm emb{m.emb_size} hid{m.hidden_size} x{m.n_layers} "
                     f"B{cfg.train.global_batch} T{cfg.train.bptt} V{vocab}",
             "value": tps, "unit": "tokens/s"}]
