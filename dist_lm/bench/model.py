"""`dist-lm bench model`: training-step throughput (forward + backward, tokens/s) of PTB-size models.

Compared in one run, steps interleaved: the AWD-LSTM PTB model (emb 400, hidden 1150, 3 layers,
tied, vocab 10k) against the QRNN PTB model of awd-lstm-lm (emb 400, hidden 1550, 4 layers,
window 2 on the first layer) and a QRNN with the LSTM's sizes. Batch 20 streams x 70 steps,
training mode with the default dropouts and weight drop. The optimizer step is left out (it is
the same elementwise update for both). On a GPU the same figures are measured on the device.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..models import build_model, detach_hidden
from .kernels import _interleaved

VOCAB = 10_000
MODELS = {
    "lstm (400/1150x3)": ModelConfig(arch="lstm"),
    "qrnn (400/1550x4, window 2)": ModelConfig(arch="qrnn", hidden_size=1550, n_layers=4,
                                               qrnn_window=2),
    "qrnn (400/1150x3, window 2)": ModelConfig(arch="qrnn", qrnn_window=2),
}


def run(quick: bool = False) -> list[dict]:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    T, b = 70, 20
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (T + 1, b), device=dev)
    x, y = tokens[:-1], tokens[1:]
    steps, params = {}, {}
    for name, cfg in MODELS.items():
        model = build_model(cfg, VOCAB).to(dev).train()
        params[name] = sum(p.numel() for p in model.parameters())
        state = {"h": model.init_hidden(b)}

        def step(model=model, state=state):
            model.zero_grad(set_to_none=True)
            out = model(x, state["h"], y)
            (out.nll.mean() + out.ar + out.tar).backward()
            state["h"] = detach_hidden(out.hidden)

        steps[name] = step
    med = _interleaved(steps, reps=2 if quick else 6, sync=sync)
    tps = {k: T * b / v for k, v in med.items()}
    lstm = next(iter(tps))
    rows = [{"name": f"train step {dev.type} {lstm} {params[lstm] / 1e6:.1f}M", "value": tps[lstm],
             "unit": "tokens/s"}]
    for k in list(tps)[1:]:
        rows.append({"name": f"train step {dev.type} {k} {params[k] / 1e6:.1f}M vs lstm",
                     "value": tps[k], "unit": "tokens/s", "baseline": tps[lstm],
                     "ratio": tps[k] / tps[lstm]})
    return rows
