"""`dist-lm bench kernels`: ForgetMult forward+backward, against baselines measured in the same run.

CPU: the custom op's CPU path (fused lerp forward, analytic reverse-recurrence backward) against
autograd through the reference loop (`forget_mult_reference`, which indexes f[t], x[t]: its
backward pays a full-size gradient per index), and against the best plain-autograd loop
(slices from `unbind`, no indexing cost). Shape T=70, b=20, H=1150 (AWD-LSTM PTB sizes).

CUDA (only when a GPU is present): the Triton kernels at T=140, b=60, H=2500 in bf16, as bytes
moved per second against a measured device copy, and their error against the fp32 reference.

The fused QRNN step (kernels/qrnn_fused.py: gates + forget-mult + output gate, forward and
backward from the matmul's [T, b, 3H] output) against its unfused reference, the torch sequence
QRNNLayer ran before: on CPU at T=70, b=20, H=1550 (the awd-lstm-lm PTB QRNN's large layers), on
CUDA at T=140, b=60, H=2500 in bf16 with its bandwidth and error against the fp32 reference.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..kernels.forget_mult import forget_mult, forget_mult_reference
from ..kernels.qrnn_fused import qrnn_fused, qrnn_fused_reference


def _unbind_loop(f, x, h0):
    h, out = h0, []
    for ft, xt in zip(f.unbind(0), x.unbind(0)):
        h = torch.lerp(h, xt, ft)
        out.append(h)
    return torch.stack(out)


def _fwd_bwd(fn, f, x, h0, grad):
    def step():
        for t in (f, x, h0):
            t.grad = None
        fn(f, x, h0).backward(grad)
    return step


def _timed(step, sync=lambda: None) -> float:
    sync()
    t = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - t


def _interleaved(steps: dict, reps: int, sync=lambda: None) -> dict[str, float]:
    """Median seconds per call, the candidates interleaved so load changes hit all alike."""
    for s in steps.values():
        s()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for k, s in steps.items():
            times[k].append(_timed(s, sync))
    return {k: statistics.median(v) for k, v in times.items()}


def _cpu(quick: bool) -> list[dict]:
    T, b, H = 70, 20, 1150
    g = torch.Generator().manual_seed(0)
    f = torch.rand(T, b, H, generator=g).requires_grad_()
    x = torch.randn(T, b, H, generator=g).requires_grad_()
    h0 = torch.randn(b, H, generator=g).requires_grad_()
    grad = torch.randn(T, b, H, generator=g)
    med = _interleaved({"op": _fwd_bwd(forget_mult, f, x, h0, grad),
                        "reference": _fwd_bwd(forget_mult_reference, f, x, h0, grad),
                        "unbind": _fwd_bwd(_unbind_loop, f, x, h0, grad)}, reps=3 if quick else 10)
    name = f"forget_mult cpu fwd+bwd T={T} b={b} H={H}"
    return [
        {"name": name + " (op)", "value": med["op"] * 1e3, "unit": "ms"},
        {"name": name + " vs reference-loop autograd", "value": med["op"] * 1e3, "unit": "ms",
         "baseline": med["reference"] * 1e3, "ratio": med["reference"] / med["op"]},
        {"name": name + " vs unbind-loop autograd", "value": med["op"] * 1e3, "unit": "ms",
         "baseline": med["unbind"] * 1e3, "ratio": med["unbind"] / med["op"]},
    ]


def _cuda(quick: bool) -> list[dict]:
    T, b, H = 140, 60, 2500
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    f32 = torch.rand(T, b, H, device=dev, generator=g)
    x32 = torch.randn(T, b, H, device=dev, generator=g)
    h0 = torch.randn(b, H, device=dev, generator=g)
    grad = torch.randn(T, b, H, device=dev, generator=g).to(dt)
    f = f32.to(dt).requires_grad_()
    x = x32.to(dt).requires_grad_()
    h0b = h0.clone().requires_grad_()
    sync = torch.cuda.synchronize
    src = torch.empty(9 * T * b * H, device=dev, dtype=dt)  # as many bytes as fwd+bwd move
    dst = torch.empty_like(src)
    med = _interleaved({"op": _fwd_bwd(forget_mult, f, x, h0b, grad),
                        "copy": lambda: dst.copy_(src)}, reps=5 if quick else 20, sync=sync)
    moved = 9 * T * b * H * 2  # fwd reads f, x, writes h; bwd reads dh, f, x, h, writes df, dx
    op_bw, copy_bw = moved / med["op"] / 1e9, 2 * src.numel() * 2 / med["copy"] / 1e9
    # error of the bf16 kernel against the fp32 reference on the same (bf16-rounded) inputs
    fr, xr = f.detach().float().requires_grad_(), x.detach().float().requires_grad_()
    hr = h0.clone().requires_grad_()
    ref = forget_mult_reference(fr, xr, hr)
    ref.backward(grad.float())
    f.grad = x.grad = h0b.grad = None
    out = forget_mult(f, x, h0b)
    out.backward(grad)

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    name = f"forget_mult triton bf16 fwd+bwd T={T} b={b} H={H}"
    return [
        {"name": name, "value": med["op"] * 1e3, "unit": "ms"},
        {"name": name + " bandwidth vs copy", "value": op_bw, "unit": "GB/s",
         "baseline": copy_bw, "ratio": op_bw / copy_bw},
        {"name": name + " rel. error h vs fp32 ref", "value": rel(out, ref.detach()), "unit": "rel"},
        {"name": name + " rel. error df vs fp32 ref", "value": rel(f.grad, fr.grad), "unit": "rel"},
        {"name": name + " rel. error dx vs fp32 ref", "value": rel(x.grad, xr.grad), "unit": "rel"},
    ]


def _fused_step(fn, y, c0, grad):
    def step():
        y.grad = c0.grad = None
        h, _ = fn(y, c0)
        h.backward(grad)
    return step


def _fused_inputs(T, b, H, dev, dt):
    g = torch.Generator(device=dev).manual_seed(0)
    y = (torch.randn(T, b, 3 * H, device=dev, generator=g) * 2).to(dt).requires_grad_()
    c0 = torch.randn(b, H, device=dev, generator=g).requires_grad_()
    grad = torch.randn(T, b, H, device=dev, generator=g).to(dt)
    return y, c0, grad


def _cpu_fused(quick: bool) -> list[dict]:
    T, b, H = 70, 20, 1550
    y, c0, grad = _fused_inputs(T, b, H, torch.device("cpu"), torch.float32)
    med = _interleaved({"fused": _fused_step(qrnn_fused, y, c0, grad),
                        "unfused": _fused_step(qrnn_fused_reference, y, c0, grad)},
                       reps=3 if quick else 10)
    return [{"name": f"qrnn fused step cpu fwd+bwd T={T} b={b} H={H} vs unfused torch",
             "value": med["fused"] * 1e3, "unit": "ms", "baseline": med["unfused"] * 1e3,
             "ratio": med["unfused"] / med["fused"]}]


def _cuda_fused(quick: bool) -> list[dict]:
    T, b, H = 140, 60, 2500
    dev, dt = torch.device("cuda"), torch.bfloat16
    y, c0, grad = _fused_inputs(T, b, H, dev, dt)
    src = torch.empty(13 * T * b * H, device=dev, dtype=dt)  # about as many bytes as fwd+bwd move
    dst = torch.empty_like(src)
    med = _interleaved({"fused": _fused_step(qrnn_fused, y, c0, grad),
                        "unfused": _fused_step(qrnn_fused_reference, y, c0, grad),
                        "copy": lambda: dst.copy_(src)}, reps=5 if quick else 20,
                       sync=torch.cuda.synchronize)
    # fwd reads y (3), writes h, c; bwd reads dh, y (3), c, writes dy (3): 13 T*b*H elements
    moved = 13 * T * b * H * 2
    bw, copy_bw = moved / med["fused"] / 1e9, 2 * src.numel() * 2 / med["copy"] / 1e9
    yr, cr = y.detach().float().requires_grad_(), c0.detach().clone().requires_grad_()
    h_ref, _ = qrnn_fused_reference(yr, cr)
    h_ref.backward(grad.float())
    y.grad = c0.grad = None
    h, _ = qrnn_fused(y, c0)
    h.backward(grad)

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    name = f"qrnn fused step triton bf16 fwd+bwd T={T} b={b} H={H}"
    return [
        {"name": name + " vs unfused torch", "value": med["fused"] * 1e3, "unit": "ms",
         "baseline": med["unfused"] * 1e3, "ratio": med["unfused"] / med["fused"]},
        {"name": name + " bandwidth vs copy", "value": bw, "unit": "GB/s", "baseline": copy_bw,
         "ratio": bw / copy_bw},
        {"name": name + " rel. error h vs fp32 ref", "value": rel(h, h_ref.detach()),
         "unit": "rel"},
        {"name": name + " rel. error dy vs fp32 ref", "value": rel(y.grad, yr.grad), "unit": "rel"},
        {"name": name + " rel. error dc0 vs fp32 ref", "value": rel(c0.grad, cr.grad),
         "unit": "rel"},
    ]


def run(quick: bool = False) -> list[dict]:
    rows = _cpu(quick) + _cpu_fused(quick)
    if torch.cuda.is_available():
        rows += _cuda(quick) + _cuda_fused(quick)
    return rows
