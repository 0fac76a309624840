"""`dist-lm bench model`: training-step throughput (forward + backward, tokens/s) of PTB-size models.

Compared in one run, steps interleaved: the AWD-LSTM PTB model (emb 400, hidden 1150, 3 layers,
tied, vocab 10k) against the QRNN PTB model of awd-lstm-lm (emb 400, hidden 1550, 4 layers,
window 2 on the first layer) and a QRNN with the LSTM's sizes. Batch 20 streams x 70 steps,
training mode with the default dropouts and weight drop. The optimizer step is left out (it is
the same elementwise update for both). On a GPU the same figures are measured on the device.

The awd-lstm-lm QRNN runs twice: with its fused elementwise op (kernels/qrnn_fused.py, what
training uses) and with that op's unfused reference (the torch sequence it replaced), so one run
shows both. A last row times the matrix multiplies of that model's step alone (forward, input
gradient and weight gradient of every gate matrix and of the tied softmax, same shapes, nothing
else): no implementation of that model's step can be faster, so LSTM step time / that time is
the ceiling on the QRNN/LSTM ratio on the machine at hand; the "of its GEMM ceiling" rows give
each QRNN PTB step's tokens/s as a fraction of it. On CPU three final rows time the models'
replacements of torch ops alone: fused Philox weight drop against F.dropout and against the
keep_mask product it replaced, softmax_nll against F.cross_entropy; then the loss of the full,
adaptive and hierarchical softmax heads at V = 10k, 33k and 267k (see _head_rows).
"""

from __future__ import annotations

import contextlib

import torch

from ..config import ModelConfig
from ..kernels.qrnn_fused import unfused
from ..models import build_model, detach_hidden
from .kernels import _interleaved

VOCAB = 10_000
FLOOR = "qrnn (400/1550x4, window 2)"  # the model whose GEMM floor is timed
MODELS = {
    "lstm (400/1150x3)": ModelConfig(arch="lstm"),
    "qrnn (400/1550x4, window 2)": ModelConfig(arch="qrnn", hidden_size=1550, n_layers=4,
                                               qrnn_window=2),
    "qrnn (400/1150x3, window 2)": ModelConfig(arch="qrnn", qrnn_window=2),
}
UNFUSED = FLOOR + ", elementwise unfused"  # the same model on qrnn_fused's reference path
MODELS[UNFUSED] = MODELS[FLOOR]


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

        def step(model=model, state=state, name=name):
            with unfused() if name == UNFUSED else contextlib.nullcontext():
                model.zero_grad(set_to_none=True)
                out = model(x, state["h"], y)
                (out.nll.mean() + out.ar + out.tar).backward()
            state["h"] = detach_hidden(out.hidden)

        steps[name] = step
        if name == FLOOR:
            gemms = _gemm_step(model, T * b, dev)
    steps[FLOOR + " GEMMs alone"] = gemms
    med = _interleaved(steps, reps=2 if quick else 6, sync=sync)
    tps = {k: T * b / v for k, v in med.items()}
    lstm = next(iter(tps))
    rows = [{"name": f"train step {dev.type} {lstm} {params[lstm] / 1e6:.1f}M", "value": tps[lstm],
             "unit": "tokens/s"}]
    for k in list(tps)[1:]:
        if k not in params:  # the GEMM floor
            rows.append({"name": f"train step {dev.type} {k}: ceiling on the ratio to lstm",
                         "value": tps[k], "unit": "tokens/s", "baseline": tps[lstm],
                         "ratio": tps[k] / tps[lstm]})
            continue
        rows.append({"name": f"train step {dev.type} {k} {params[k] / 1e6:.1f}M vs lstm",
                     "value": tps[k], "unit": "tokens/s", "baseline": tps[lstm],
                     "ratio": tps[k] / tps[lstm]})
    ceiling = tps[FLOOR + " GEMMs alone"]
    for k in (FLOOR, UNFUSED):
        rows.append({"name": f"train step {dev.type} {k}: fraction of its GEMM ceiling",
                     "value": tps[k], "unit": "tokens/s", "baseline": ceiling,
                     "ratio": tps[k] / ceiling})
    if dev.type == "cpu":
        rows += _replacement_rows(quick)
        rows += _head_rows(quick)
    return rows


# Head rows: (V, N tokens); N shrinks with V so that the full softmax's step stays near a second.
HEAD_SIZES = ((10_000, 1400), (33_278, 700), (267_735, 140))
WT103_CUTOFFS = [2800, 20000, 76000]


def _head_rows(quick: bool) -> list[dict]:
    """Forward + backward of the loss alone for the three large-vocabulary heads, tied, d=400,
    on CPU, interleaved per vocabulary size: full softmax (the baseline), adaptive softmax (the
    WikiText-103 cutoffs that fall inside V: [2800] at 10k, [2800, 20000] at 33k, all three at
    267k) and hierarchical softmax (about sqrt(V) classes). Targets are Zipf-distributed
    (p(id) ~ 1/(id+1), so low ids are frequent, as the adaptive head assumes); N tokens per step
    as HEAD_SIZES says (70x20 at 10k, 700 at 33k, 140 at 267k; a quarter of that with --quick).
    Ratio = softmax time / head time."""
    from ..models.heads import AdaptiveHead, HierarchicalHead, SoftmaxHead, default_classes

    d, rows = 400, []
    for vocab, n in HEAD_SIZES:
        n = n // 4 if quick else n
        g = torch.Generator().manual_seed(0)
        emb = torch.empty(vocab, d).uniform_(-0.1, 0.1, generator=g).requires_grad_()
        h = (torch.randn(n, 1, d, generator=g) * 0.5).requires_grad_()
        zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
        targets = torch.multinomial(zipf, n, replacement=True, generator=g).view(n, 1)
        cuts = [c for c in WT103_CUTOFFS if c < vocab]
        heads = {"softmax": SoftmaxHead(d, vocab, tied=True),
                 f"adaptive {cuts}": AdaptiveHead(d, vocab, cuts, tied=True),
                 f"hierarchical ({default_classes(vocab)} classes)":
                     HierarchicalHead(d, vocab, default_classes(vocab), tied=True)}

        def step(head):
            def f():
                emb.grad = h.grad = None
                head.zero_grad(set_to_none=True)
                head.nll(h, targets, emb).mean().backward()
            return f

        med = _interleaved({k: step(m) for k, m in heads.items()}, reps=2 if quick else 5)
        full = med["softmax"]
        rows.append({"name": f"head loss fwd+bwd cpu V={vocab} N={n} d={d}: softmax",
                     "value": full * 1e3, "unit": "ms"})
        for k in list(heads)[1:]:
            rows.append({"name": f"head loss fwd+bwd cpu V={vocab} N={n} d={d}: {k} vs softmax",
                         "value": med[k] * 1e3, "unit": "ms", "baseline": full * 1e3,
                         "ratio": full / med[k]})
        del emb, h, heads
    return rows


def _replacement_rows(quick: bool) -> list[dict]:
    """CPU replacements against what they replace, forward + backward, interleaved: weight drop
    (the fused Philox op) on the QRNN's largest gate matrix against F.dropout (`bernoulli_`) and
    against the keep_mask product it replaced, and the softmax loss (softmax_nll) at the PTB
    step's [1400, 10000] logits against F.cross_entropy."""
    import torch.nn.functional as F

    from ..models.dropout import keep_mask, weight_drop
    from ..models.heads import softmax_nll

    w = torch.randn(4650, 1550, requires_grad=True)
    logits = torch.randn(1400, VOCAB, requires_grad=True)
    targets = torch.randint(0, VOCAB, (1400,))

    def timed(f, x):
        def step():
            x.grad = None
            f(x).sum().backward()
        return step

    def masked(v):  # weight drop before the fused Philox op: keep_mask, a float mask, a product
        return v * keep_mask(v.shape, 0.5).to(v.dtype).mul_(2.0)

    reps = 3 if quick else 10
    rows = []
    for name, unit, x, new, old in (
            ("weight drop fwd+bwd cpu [4650, 1550] p=0.5: fused Philox vs F.dropout", "ms", w,
             lambda v: weight_drop(v, 0.5, True), lambda v: F.dropout(v, 0.5, True)),
            ("weight drop fwd+bwd cpu [4650, 1550] p=0.5: fused Philox vs keep_mask * w", "ms", w,
             lambda v: weight_drop(v, 0.5, True), masked),
            ("softmax loss fwd+bwd cpu [1400, 10000]: softmax_nll vs F.cross_entropy", "ms", logits,
             lambda v: softmax_nll(v, targets),
             lambda v: F.cross_entropy(v, targets, reduction="none"))):
        med = _interleaved({"new": timed(new, x), "old": timed(old, x)}, reps=reps)
        rows.append({"name": name, "value": med["new"] * 1e3, "unit": unit,
                     "baseline": med["old"] * 1e3, "ratio": med["old"] / med["new"]})
    return rows


def _gemm_step(model, n: int, dev: torch.device):
    """The matrix multiplies of one training step of a QRNN `model` over n = T*b tokens, alone:
    for each gate matrix W [out, in] (and the tied softmax [V, emb]) the forward X W^T, the input
    gradient G W and the weight gradient G^T X, on random matrices of the step's shapes."""
    shapes = [tuple(rnn.weight_raw.shape) for rnn in model.rnns] + [tuple(model.encoder.weight.shape)]
    g = torch.Generator().manual_seed(1)
    mats = [(torch.randn(n, k, generator=g).to(dev), torch.randn(m, k, generator=g).to(dev),
             torch.randn(n, m, generator=g).to(dev)) for m, k in shapes]

    def step():
        for x, w, grad in mats:
            x @ w.t()
            grad @ w
            grad.t() @ x

    return step
