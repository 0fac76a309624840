"""`dist-lm bench train`: single-device training-step throughput (tokens/s).

The step is the Trainer's (local engine): forward on a [bptt, batch] window with the hidden
state carried, loss = nll + AR + TAR, backward, clip over all parameters, SGD step. Synthetic
tokens (speed does not depend on the text). The full-size figure is also recorded as the
single-device baseline for its model, vocabulary, batch, bptt and dtype
(dist_lm.metrics.baselines), which multi-rank runs of that configuration use for their
scaling efficiency. A second row is the gradient noise scale's cost per step
(`noise_scale_cost`).
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
             "value": tps, "unit": "tokens/s"}] + noise_scale_cost(quick)


def noise_scale_cost(quick: bool, reps: int = 0) -> list[dict]:
    """The gradient noise scale's cost (train.noise_scale_every=1: every step measured) at the
    PTB recipe's size (configs/ptb_awd_lstm.toml: 400/1150x3, batch 20, bptt 70, vocab 10k) as
    2 micro batches of 10 streams, the least accumulation it needs: the Trainer's step (micro
    batches, clip, SGD step) of one model with the noise scale's hooks and update against an
    identical model without, interleaved: ratio = step time off / on (0.97: 3 % dearer); and
    the added work alone, ratio = a step's time / its time (33: 3 %). reps: 0 is 12 (2 quick)."""
    from ..models import build_model, detach_hidden
    from ..train.engines import LocalEngine
    from ..train.noise_scale import NoiseScale
    from .kernels import _interleaved

    cfg = Config()  # the model defaults are configs/ptb_awd_lstm.toml's
    T, B, micro, vocab = 70, 20, 10, 10_000
    if quick:
        cfg.model.emb_size, cfg.model.hidden_size, cfg.model.n_layers = 32, 64, 2
        T, vocab = 20, 1000
    accum = B // micro
    data = torch.randint(0, vocab, (T + 1, B), generator=torch.Generator().manual_seed(0))

    def step_fn(measure: bool):
        torch.manual_seed(0)
        model = build_model(cfg.model, vocab).train()
        engine = LocalEngine(model, cfg, accum)
        noise = NoiseScale(model, micro=micro, accum=accum, world=1, global_batch=B,
                           base_batch=B, bptt=T, every=1,
                           device=torch.device("cpu")) if measure else None
        hidden = [model.init_hidden(micro) for _ in range(accum)]

        def step():
            if noise:
                noise.begin(0)
            for j in range(accum):
                cols = slice(j * micro, (j + 1) * micro)
                out = model(data[:-1, cols], hidden[j], data[1:, cols])
                engine.backward(out.nll.mean() + out.ar + out.tar, last=j == accum - 1)
                hidden[j] = detach_hidden(out.hidden)
            norm = engine.clip(cfg.optim.clip)
            engine.apply()
            if noise:
                noise.update(norm)

        return step

    def added_work():
        """What measuring adds to a step, alone: each micro batch's norms of gradients shaped
        like the model's (the hooks' work) and the update (robust to a loaded machine, where
        the difference of two step times is within their noise)."""
        model = build_model(cfg.model, vocab)
        noise = NoiseScale(model, micro=micro, accum=accum, world=1, global_batch=B,
                           base_batch=B, bptt=T, every=1, device=torch.device("cpu"))
        grads = [torch.randn_like(p) for p in model.parameters()]

        def work():
            noise.begin(0)
            for _ in range(accum):
                for g in grads:
                    noise._hook(g)
            noise.update(torch.ones(()))

        return work

    med = _interleaved({"off": step_fn(False), "on": step_fn(True), "added": added_work()},
                       reps=reps or (2 if quick else 12))
    m = cfg.model
    name = (f"train step lstm {m.emb_size}/{m.hidden_size}x{m.n_layers} B{B} ({accum}x{micro}) "
            f"T{T} V{vocab}: noise scale")
    return [{"name": f"{name} every step vs off", "value": med["on"] * 1e3, "unit": "ms",
             "baseline": med["off"] * 1e3, "ratio": med["off"] / med["on"]},
            {"name": f"{name}'s added work alone vs a step", "value": med["added"] * 1e3,
             "unit": "ms", "baseline": med["off"] * 1e3, "ratio": med["off"] / med["added"]}]
