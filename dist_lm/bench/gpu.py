"""`dist-lm bench gpu`: one command for a GPU machine, checks and figures in under 8 minutes.

    dist-lm bench gpu --json bench-gpu.json     # on the GPU machine
    dist-lm bench gpu --dry --json dry.json     # every section at tiny sizes on CPU (tests)

Sections, in this order; the JSON file is rewritten (atomically) after each one, so a run cut
short still holds what it measured, and a section that raises is recorded as a failed check
while the others still run:

  env          torch, CUDA, cuDNN, Triton, NCCL and DeepSpeed versions; a C compiler that
               builds a program against Python.h (Triton builds its launcher at first launch,
               the CPU QRNN kernel is built the same way); TF32 state; GPU name and memory
  kernels      forget-mult and the fused QRNN op against an fp64 reference (a plain torch loop,
               autograd through it) at the recipe shapes in fp32, bf16 and fp16: forward
               outputs and every gradient, max |error| / max |reference| per tensor against a
               per-dtype tolerance; a zoneout case (mask, eval scale, dL/dc given); one case per
               op above 2^31 elements (bf16, checked on lanes at both ends of the tensor)
  kernel_time  forward and backward time of both ops against the bytes they must move, as a
               fraction of a device-to-device copy of as many bytes measured in the same run
               (target: the fused op at the WT-103 shape >= 60 % forward and backward)
  train        real Trainer runs on synthetic Zipf tokens: the WT-103 QRNN recipe (full
               267,735-word vocabulary, bf16) and the PTB AWD-LSTM recipe (fp32 and bf16):
               tokens/s, loss going down (a check), peak memory, host syncs per step
  dist         2 ranks on one GPU over gloo (torchrun) against 1 rank, 1-rank DDP on NCCL,
               1-rank DeepSpeed ZeRO-1 bf16: loss curves compared with the 1-rank run

A failed check (an "ok": false row) makes the command exit non-zero (UserError naming them).

--dry runs the same code at tiny sizes on the CPU: the Triton kernels under TRITON_INTERPRET=1
in a child process (it must be set before triton is imported) with the same comparison,
tolerances and verdicts; kernel_time times the CPU kernels against a memory copy; train and
dist run the same Trainer paths on CPU (gloo for NCCL; DeepSpeed in fp32, since its bf16 needs
CUDA: deepspeed_config enables bf16 only there); host syncs and GPU memory read "n/a".

Self-test switches (environment variables):
  DIST_LM_BENCH_GPU_TOL_SCALE=F    multiply every kernel tolerance by F (0: every kernel case
                                   must fail, which is how the failure path is tested)
  DIST_LM_BENCH_GPU_SECTIONS=a,b   run only these sections (e.g. to rerun one)
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fileio import write_text_atomic

SECTIONS = ("env", "kernels", "kernel_time", "train", "dist")
TOL_ENV = "DIST_LM_BENCH_GPU_TOL_SCALE"
SECTIONS_ENV = "DIST_LM_BENCH_GPU_SECTIONS"
REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DT_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# max |kernel - fp64 reference| / max |reference| per output tensor. The references start from
# the same (rounded) inputs, so what is left is the kernel's fp32 arithmetic and the rounding of
# its outputs and of the state it saves for the backward (c, h in 16 bits): ~4x the unit
# roundoff of the output dtype for 16-bit (bf16 2^-8, fp16 2^-11), fp32 gate math for fp32.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
LOSS_RTOL = 1e-4  # loss curves that must be equal (fp32, TF32 off): max relative difference
LOSS_RTOL_BF16 = 5e-2  # DeepSpeed bf16 against the fp32 curve
FUSED_TARGET = 0.6  # fused op at the WT-103 shape: bandwidth as a fraction of a device copy
WT103_VOCAB = 267_735
BUDGET_S = 480  # the whole command on one H200-class GPU


# ---------------------------------------------------------------------------------- sizes


@dataclass
class Plan:
    """Every size the bench uses; `Plan(dry)` picks the GPU or the tiny CPU set."""

    dry: bool
    device: str = "cuda"
    kernel_shapes: list = field(default_factory=list)  # (T, b, H) recipe shapes
    zoneout_shape: tuple = ()
    big_forget: tuple = ()  # T*b*H > 2^31 on the GPU
    big_fused: tuple = ()   # T*b*3H > 2^31 on the GPU
    big_lanes: int = 128    # lanes compared at each end of a big tensor
    time_shapes: list = field(default_factory=list)
    time_dtype: torch.dtype = torch.bfloat16
    time_reps: int = 15
    time_calls: int = 10    # calls per timed repetition (keeps the GPU queue fed)
    wt103_vocab: int = WT103_VOCAB
    ptb_vocab: int = 10_000
    train_steps: int = 30
    log_every: int = 10
    sync_window: tuple = (12, 5)  # count host syncs over steps 13..17 (no log step among them)
    dist_steps: int = 6
    tiny: dict = field(default_factory=dict)  # model/batch overrides for --dry

    def __post_init__(self):
        if not self.dry:
            self.kernel_shapes = [(140, 60, 2500), (70, 20, 1550), (140, 10, 2500),
                                  (140, 1, 2500), (1, 60, 2500)]
            self.zoneout_shape = (70, 20, 1550)
            self.big_forget = (140, 60, 256_000)  # 2,150,400,000 elements per tensor
            self.big_fused = (140, 20, 256_000)   # y: 2,150,400,000 elements
            self.time_shapes = [(140, 60, 2500), (70, 20, 1550)]
            return
        self.device = "cpu"
        # the same pattern at tiny sizes: long/short T, H not a multiple of 16, b = 1, T = 1
        # (the interpreter's cost grows with T x b: one Python-level program per row and block)
        self.kernel_shapes = [(3, 3, 20), (2, 2, 14), (3, 2, 20), (3, 1, 20), (1, 3, 20)]
        self.zoneout_shape = (2, 2, 14)
        self.big_forget = (3, 2, 600)  # several program blocks, the last one ragged
        self.big_fused = (2, 1, 600)
        self.big_lanes = 16
        self.time_shapes = [(20, 4, 64)]
        self.time_dtype = torch.float32  # the CPU kernels are fp32
        self.time_reps, self.time_calls = 3, 1
        self.wt103_vocab, self.ptb_vocab = 300, 200
        self.train_steps, self.log_every, self.sync_window = 6, 2, (2, 1)
        self.dist_steps = 4
        self.tiny = {"model.emb_size": 16, "model.hidden_size": 24, "model.n_layers": 2,
                     "train.global_batch": 4, "train.bptt": 12, "data.eval_batch_size": 2}


def tol_scale() -> float:
    raw = os.environ.get(TOL_ENV, "1")
    try:
        return float(raw)
    except ValueError:
        raise UserError(f"{TOL_ENV}={raw!r} is not a number; unset it or give a factor such as "
                        f"0.5.") from None


# ---------------------------------------------------------------------------------- env


def _version(dist: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _compiler() -> tuple[str | None, str]:
    """The C compiler Triton would pick ($CC, else gcc, else clang) and whether it builds a
    shared object against Python.h (what Triton's launcher stub needs)."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "no C compiler ($CC, gcc, clang) found"
    inc = sysconfig.get_paths()["include"]
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "probe.c"
        src.write_text("#include <Python.h>\nint probe(void) { return Py_IsInitialized(); }\n")
        try:
            p = subprocess.run([cc, "-shared", "-fPIC", f"-I{inc}", str(src), "-o",
                                str(Path(d) / "probe.so")], capture_output=True, text=True,
                               timeout=60)
        except OSError as exc:
            return cc, f"{cc} does not run ({exc})"
        if p.returncode:
            return cc, f"{cc} failed to build against {inc}/Python.h: {p.stderr.strip()[-300:]}"
    return cc, "ok"


def section_env(plan: Plan, ctx: dict) -> list[dict]:
    cuda = torch.cuda.is_available()
    na = "n/a"
    nccl = na
    if cuda:
        with contextlib.suppress(Exception):
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    rows = [
        {"name": "python", "value": platform.python_version(), "unit": ""},
        {"name": "torch", "value": torch.__version__, "unit": ""},
        {"name": "CUDA (torch build)", "value": torch.version.cuda or na, "unit": ""},
        {"name": "cuDNN", "value": str(torch.backends.cudnn.version() or na) if cuda else na,
         "unit": ""},
        {"name": "Triton", "value": _version("triton"), "unit": ""},
        {"name": "NCCL", "value": nccl, "unit": ""},
        {"name": "DeepSpeed", "value": _version("deepspeed"), "unit": ""},
    ]
    cc, status = _compiler()
    rows.append({"name": "C compiler builds against Python.h (Triton's launcher)",
                 "value": cc or "none", "unit": "", "ok": status == "ok",
                 **({} if status == "ok" else {"error": status})})
    rows += [
        {"name": "TF32 matmul (torch default in this process)",
         "value": str(torch.backends.cuda.matmul.allow_tf32), "unit": ""},
        {"name": "TF32 cuDNN (torch default in this process)",
         "value": str(torch.backends.cudnn.allow_tf32), "unit": ""},
        {"name": "float32 matmul precision", "value": torch.get_float32_matmul_precision(),
         "unit": ""},
    ]
    with contextlib.suppress(Exception):
        from ..config import Config

        rows.append({"name": "train.tf32 default (the Trainer sets TF32 on CUDA from it)",
                     "value": str(Config().train.tf32), "unit": ""})
    if cuda:
        prop = torch.cuda.get_device_properties(0)
        rows += [{"name": "GPU", "value": prop.name, "unit": ""},
                 {"name": "GPU memory", "value": prop.total_memory / 2**30, "unit": "GiB"},
                 {"name": "GPU compute capability", "value": f"{prop.major}.{prop.minor}",
                  "unit": ""},
                 {"name": "GPUs visible", "value": torch.cuda.device_count(), "unit": ""}]
    else:
        rows += [{"name": "GPU", "value": na, "unit": ""},
                 {"name": "GPU memory", "value": na, "unit": "GiB"}]
    rows.append({"name": "CPUs", "value": os.cpu_count() or 0, "unit": ""})
    return rows


# ---------------------------------------------------------------------------------- kernels


def _ref_forget_mult(f, x, h0):
    """The recurrence as a plain torch loop over slices (autograd through it)."""
    h, out = h0, []
    for ft, xt in zip(f.unbind(0), x.unbind(0)):
        h = ft * xt + (1 - ft) * h
        out.append(h)
    return torch.stack(out)


def _ref_fused(y, c0, mask, scale):
    """The fused QRNN step written out: z = tanh, f = sigmoid * mask * scale, o = sigmoid."""
    z, f, o = y.chunk(3, dim=-1)
    f = torch.sigmoid(f) * scale
    if mask is not None:
        f = f * mask.to(f.dtype)
    c = _ref_forget_mult(f, torch.tanh(z), c0)
    return torch.sigmoid(o) * c, c


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (inf when got is not finite)."""
    got = got.detach().double()
    if not bool(torch.isfinite(got).all()):
        return math.inf
    den = float(want.abs().max()) if want.numel() else 0.0
    num = float((got - want).abs().max()) if want.numel() else 0.0
    return num / den if den > 0 else num


def _verdict(name: str, errors: dict[str, float], dtype, scale: float, **extra) -> dict:
    tol = TOLERANCE[dtype] * scale
    worst = max(errors, key=errors.get)
    return {"name": name, "value": errors[worst], "unit": "max rel err", "tolerance": tol,
            "worst": worst, "errors": errors, "ok": all(e <= tol for e in errors.values()),
            **extra}


def _lanes(n: int, k: int) -> torch.Tensor | None:
    """Indices of the first and last k of n lanes (None: all of them)."""
    if 2 * k >= n:
        return None
    return torch.cat([torch.arange(k), torch.arange(n - k, n)])


def _forget_run(f, x, h0, gh, direct: bool):
    """h, df, dx, dh0 from the Triton kernels: called directly (--dry, the interpreter on CPU
    tensors) or through the public op and autograd (CUDA: the custom op's Triton kernels)."""
    if direct:
        from ..kernels.forget_mult_triton import (forget_mult_triton_backward,
                                                  forget_mult_triton_forward)

        h = forget_mult_triton_forward(f, x, h0)
        return (h, *forget_mult_triton_backward(gh, f, x, h0, h))
    from ..kernels import forget_mult

    leaves = [t.detach().requires_grad_() for t in (f, x, h0)]
    h = forget_mult(*leaves)
    grads = torch.autograd.grad(h, leaves, gh)
    return (h.detach(), *grads)


def _fused_run(y, c0, mask, scale, gh, gc, direct: bool):
    """h, c, dy, dc0 of the fused op (see _forget_run for `direct`)."""
    if direct:
        from ..kernels.qrnn_fused_triton import (qrnn_fused_triton_backward,
                                                 qrnn_fused_triton_forward)

        h, c = qrnn_fused_triton_forward(y, c0, mask, scale)
        return (h, c, *qrnn_fused_triton_backward(gh, gc, y, c0, mask, c, scale))
    from ..kernels import qrnn_fused

    yl, cl = y.detach().requires_grad_(), c0.detach().requires_grad_()
    h, c = qrnn_fused(yl, cl, mask, scale)
    outs, grads = ((h, c), (gh, gc)) if gc is not None else ((h,), (gh,))
    dy, dc0 = torch.autograd.grad(outs, (yl, cl), grads)
    return h.detach(), c.detach(), dy, dc0


def check_forget_mult(shape, dtype, device, direct: bool, scale: float, lanes_k: int = 0,
                      seed: int = 0) -> dict:
    T, b, H = shape
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    f = torch.rand(T, b, H, device=dev, generator=g, dtype=dtype)
    x = torch.randn(T, b, H, device=dev, generator=g, dtype=dtype)
    h0 = torch.randn(b, H, device=dev, generator=g)  # the carry is fp32
    gh = torch.randn(T, b, H, device=dev, generator=g, dtype=dtype)
    got = _forget_run(f, x, h0, gh, direct)
    idx = _lanes(b * H, lanes_k) if lanes_k else None

    def sub(t):  # [T, b, H] or [b, H] -> the compared lanes, fp64
        t = t.reshape(*t.shape[:-2], b * H)
        return (t if idx is None else t.index_select(-1, idx.to(t.device))).double()

    leaves = [sub(t).requires_grad_() for t in (f, x, h0)]
    ref = _ref_forget_mult(*leaves)
    want = (ref.detach(), *torch.autograd.grad(ref, leaves, sub(gh)))
    errors = {k: _max_rel(sub(a), w) for k, a, w in zip(("h", "df", "dx", "dh0"), got, want)}
    del got, f, x, gh
    where = "" if idx is None else f", {len(idx)} lanes at both ends"
    return _verdict(f"forget_mult {DT_NAME[dtype]} T={T} b={b} H={H}{where}", errors, dtype,
                    scale, elements=T * b * H)


def check_fused(shape, dtype, device, direct: bool, scale: float, zoneout: bool = False,
                lanes_k: int = 0, seed: int = 0) -> dict:
    T, b, H = shape
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    y = torch.randn(T, b, 3 * H, device=dev, generator=g, dtype=dtype).mul_(2)
    c0 = torch.randn(b, H, device=dev, generator=g)
    mask = torch.rand(T, b, H, device=dev, generator=g) < 0.75 if zoneout else None
    fscale = 0.9 if zoneout else 1.0
    gh = torch.randn(T, b, H, device=dev, generator=g, dtype=dtype)
    gc = torch.randn(T, b, H, device=dev, generator=g, dtype=dtype) if zoneout else None
    got = _fused_run(y, c0, mask, fscale, gh, gc, direct)
    rows = _lanes(b, 1) if lanes_k else None
    cols = _lanes(H, lanes_k) if lanes_k else None

    def sub(t, gates=1):  # [T, b, gates*H] / [b, H] -> the compared rows and columns, fp64
        if rows is not None:
            t = t.index_select(-2, rows.to(t.device))
        if cols is not None:
            t = t.reshape(*t.shape[:-1], gates, H).index_select(-1, cols.to(t.device))
            t = t.reshape(*t.shape[:-2], gates * len(cols))
        return t.double()

    yr, cr = sub(y, 3).requires_grad_(), sub(c0).requires_grad_()
    mr = None if mask is None else sub(mask).bool()
    hr, crr = _ref_fused(yr, cr, mr, fscale)
    loss = (hr * sub(gh)).sum() + ((crr * sub(gc)).sum() if gc is not None else 0)
    dyr, dcr = torch.autograd.grad(loss, (yr, cr))
    h, c, dy, dc0 = got
    dys, dyrs = sub(dy, 3), dyr
    n = dys.shape[-1] // 3
    errors = {"h": _max_rel(sub(h), hr.detach()), "c": _max_rel(sub(c), crr.detach())}
    for i, k in enumerate(("dz", "df", "do")):
        errors[k] = _max_rel(dys[..., i * n:(i + 1) * n], dyrs[..., i * n:(i + 1) * n])
    errors["dc0"] = _max_rel(sub(dc0), dcr)
    del got, y, h, c, dy
    what = " zoneout mask, scale 0.9, dL/dc" if zoneout else ""
    where = "" if cols is None else f", rows 0/{b - 1} x {len(cols)} columns at both ends"
    return _verdict(f"qrnn_fused {DT_NAME[dtype]} T={T} b={b} H={H}{what}{where}", errors,
                    dtype, scale, elements=T * b * 3 * H)


def kernel_checks(plan: Plan, direct: bool) -> list[dict]:
    """Every kernel case of the plan; `direct` as in _forget_run. One function for both modes:
    the comparison, tolerances and verdicts are the same code on the GPU and under the
    interpreter."""
    scale = tol_scale()
    dev = plan.device
    out = []
    for i, shape in enumerate(plan.kernel_shapes):
        for dt in DTYPES:
            out.append(check_forget_mult(shape, dt, dev, direct, scale, seed=i))
            out.append(check_fused(shape, dt, dev, direct, scale, seed=i))
            _free()
    for dt in DTYPES:
        out.append(check_fused(plan.zoneout_shape, dt, dev, direct, scale, zoneout=True, seed=7))
    # above 2^31 elements: bf16 (the recipe's dtype), lanes at both ends compared. Memory:
    # forget-mult f, x, dL/dh, h, df, dx; the fused op y, dy (3 H wide), h, c, dL/dh
    T, b, H = plan.big_forget
    big = [("forget_mult", check_forget_mult, plan.big_forget, 6 * T * b * H * 2, 11)]
    T, b, H = plan.big_fused
    big.append(("qrnn_fused", check_fused, plan.big_fused, 9 * T * b * H * 2, 12))
    for label, fn, shape, need, seed in big:
        free = torch.cuda.mem_get_info()[0] if dev == "cuda" else need * 2
        if free < 1.2 * need:
            out.append({"name": f"{label} bf16 T, b, H = {shape} (above 2^31 elements)",
                        "value": "skipped", "unit": "",
                        "error": f"needs {need / 2**30:.0f} GiB of GPU memory, "
                                 f"{free / 2**30:.0f} GiB free"})
            continue
        out.append(fn(shape, torch.bfloat16, dev, direct, scale, lanes_k=plan.big_lanes,
                      seed=seed))
        _free()
    return out


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def section_kernels(plan: Plan, ctx: dict) -> list[dict]:
    if not plan.dry:
        return kernel_checks(plan, direct=False)
    # --dry: the Triton kernels under the interpreter, in a child process (TRITON_INTERPRET
    # must be set before triton is imported), on CPU tensors
    out = Path(ctx["tmp"]) / "kernels.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-m", "dist_lm.bench.gpu", "_kernels", str(out)],
                       env=env, capture_output=True, text=True, timeout=900)
    if p.returncode or not out.is_file():
        raise RuntimeError(f"kernel checks under TRITON_INTERPRET=1 exited {p.returncode}: "
                           f"{(p.stdout + p.stderr)[-2000:]}")
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------- timing


def _timer(device: torch.device):
    """median seconds per call of fn: CUDA events around `calls` back-to-back calls on the
    GPU, perf_counter on the CPU."""
    cuda = device.type == "cuda"

    def median(fn, reps: int, calls: int) -> float:
        fn()  # warm (compiles on first launch)
        if cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(calls):
                    fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3 / calls)
            else:
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times.append((time.perf_counter() - t0) / calls)
        times.sort()
        return times[len(times) // 2]

    return median


def _kernel_fns(device: torch.device):
    """(forget fwd, forget bwd, fused fwd, fused bwd) kernel entry points: Triton on CUDA, the
    CPU paths (fp32; the fused op's C kernel) on the CPU."""
    if device.type == "cuda":
        from ..kernels.forget_mult_triton import (forget_mult_triton_backward as fb,
                                                  forget_mult_triton_forward as ff)
        from ..kernels.qrnn_fused_triton import (qrnn_fused_triton_backward as qb,
                                                 qrnn_fused_triton_forward as qf)
        return ff, fb, qf, qb
    from ..kernels import qrnn_fused_cpu
    from ..kernels.forget_mult import forget_mult_cpu_backward as fb
    from ..kernels.forget_mult import forget_mult_cpu_forward as ff

    if qrnn_fused_cpu.library() is None:
        raise RuntimeError("the CPU QRNN kernel did not build (no C compiler?)")
    return ff, fb, qrnn_fused_cpu.forward, qrnn_fused_cpu.backward


def section_kernel_time(plan: Plan, ctx: dict) -> list[dict]:
    dev = torch.device(plan.device)
    dt = plan.time_dtype
    es = torch.empty((), dtype=dt).element_size()
    median = _timer(dev)
    ff, fb, qf, qb = _kernel_fns(dev)
    rows = []
    for T, b, H in plan.time_shapes:
        n = T * b * H
        g = torch.Generator(device=dev).manual_seed(0)
        f = torch.rand(T, b, H, device=dev, generator=g).to(dt)
        x = torch.randn(T, b, H, device=dev, generator=g).to(dt)
        h0 = torch.randn(b, H, device=dev, generator=g)
        gh = torch.randn(T, b, H, device=dev, generator=g).to(dt)
        y = (torch.randn(T, b, 3 * H, device=dev, generator=g) * 2).to(dt)
        h = ff(f, x, h0)
        _, c = qf(y, h0, None, 1.0)
        # elements each kernel must read and write (the [b, H] states aside):
        # forget fwd f, x -> h; bwd dh, f, x, h -> df, dx; fused fwd y (3) -> h, c;
        # fused bwd dh, y (3), c -> dy (3)
        cases = [("forget_mult fwd", lambda: ff(f, x, h0), 3),
                 ("forget_mult bwd", lambda: fb(gh, f, x, h0, h), 6),
                 ("qrnn_fused fwd", lambda: qf(y, h0, None, 1.0), 5),
                 ("qrnn_fused bwd", lambda: qb(gh, None, y, h0, None, c, 1.0), 8)]
        for name, fn, passes in cases:
            nbytes = passes * n * es
            src = torch.empty(nbytes // es, dtype=dt, device=dev)
            dst = torch.empty_like(src)
            t_k = median(fn, plan.time_reps, plan.time_calls)
            t_c = median(lambda: dst.copy_(src), plan.time_reps, plan.time_calls)
            bw, copy_bw = nbytes / t_k / 1e9, 2 * nbytes / t_c / 1e9
            label = f"{name} {DT_NAME[dt]} T={T} b={b} H={H}"
            row = {"name": label + " bandwidth vs copy", "value": bw, "unit": "GB/s",
                   "baseline": copy_bw, "ratio": bw / copy_bw, "ms": t_k * 1e3,
                   "bytes": nbytes}
            if name.startswith("qrnn_fused") and (T, b, H) == (140, 60, 2500):
                row.update(target=FUSED_TARGET, target_met=bw / copy_bw >= FUSED_TARGET,
                           target_text=f">= {FUSED_TARGET:.0%} of the copy")
            rows.append({"name": label, "value": t_k * 1e3, "unit": "ms"})
            rows.append(row)
            del src, dst
        del f, x, gh, y, h, c
        _free()
    return rows


# ---------------------------------------------------------------------------------- training


def zipf_corpus(root: Path, vocab: int, tokens: dict[str, int], seed: int = 0,
                chunk_len: int = 65536) -> Path:
    """A prepared corpus of i.i.d. Zipf tokens (p(id) ~ 1/(id+1): low ids frequent, as the
    adaptive softmax's cutoffs assume), written with the real shard writer."""
    from ..data.shards import FORMAT, MANIFEST, SplitWriter, dtype_for
    from ..data.tokenizers import WordTokenizer

    out = Path(root) / f"zipf-{vocab}"
    if (out / MANIFEST).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1))
    cdf /= cdf[-1]
    dtype = dtype_for(vocab)
    splits = {}
    for split, n in tokens.items():
        ids = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), vocab - 1)
        w = SplitWriter(out, split, dtype, chunk_len, chunks_per_shard=16)
        w.write(ids.astype(dtype))
        splits[split] = {**w.close(), "unk": 0, "oov": 0}
    WordTokenizer(["<eos>"] + [f"w{i}" for i in range(1, vocab)]).save(out / "vocab.json")
    manifest = {"format": FORMAT, "corpus": f"synthetic-zipf-{vocab}", "tokenizer": "word",
                "vocab_size": vocab, "dtype": dtype, "chunk_len": chunk_len,
                "sources": {s: {"file": "synthetic"} for s in tokens}, "splits": splits}
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return out


def _corpus_sizes(plan: Plan, batch: int, bptt: int, eval_batch: int) -> dict[str, int]:
    """Enough train tokens that the run's steps stay inside one epoch (windows up to bptt +
    20), small valid/test splits (test runs at batch 1)."""
    per_stream = (plan.train_steps + plan.sync_window[1] + 2) * (bptt + 20) + 1
    return {"train": batch * per_stream, "valid": eval_batch * (4 * bptt + 1),
            "test": 2 * bptt + 1}


def _common(plan: Plan, run_dir: Path, shards: Path, steps: int, every: int) -> dict:
    return {"data.shards": str(shards), "train.run_dir": str(run_dir),
            "train.max_steps": steps, "log.every_steps": every, "log.wandb_mode": "disabled",
            "log.progress": False, "checkpoint.every_steps": 0, "train.device": plan.device,
            **plan.tiny}


class _SyncCounter:
    """Counts host synchronisations (torch.cuda.set_sync_debug_mode("warn") warnings) over
    the Trainer's steps start+1 .. start+n: switched on when step `start + 1` begins and off
    when step `start + n + 1` begins, so every sync of those steps (forward, backward,
    optimizer, logging, the loader) is in."""

    def __init__(self, trainer, start: int, n: int):
        self.trainer, self.start, self.n = trainer, start, n
        self.count: int | None = None
        self._cm = self._log = None
        inner = trainer.train_step

        def train_step(inputs, targets):
            step = trainer.step
            if step == start + n and self._cm is not None:
                self._stop()
            if step == start and self._cm is None and self.count is None:
                self._cm = warnings.catch_warnings(record=True)
                self._log = self._cm.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            return inner(inputs, targets)

        trainer.train_step = train_step

    def _stop(self) -> None:
        torch.cuda.set_sync_debug_mode(0)
        self.count = sum("synchroniz" in str(w.message) for w in self._log)
        self._cm.__exit__(None, None, None)
        self._cm = None

    def per_step(self) -> float | None:
        if self._cm is not None:
            self._stop()
        return None if self.count is None else self.count / self.n


def train_run(config: str | None, overrides: dict, count_syncs: tuple | None = None) -> dict:
    """One real `Trainer(cfg).fit()`; returns the logged training losses, the last interval's
    tokens/s, peak GPU memory and host syncs per step (CUDA only)."""
    from ..config import load_config
    from ..train.trainer import Trainer

    cfg = load_config(config, overrides)
    cuda = cfg.train.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tr = Trainer(cfg)
    counter = _SyncCounter(tr, *count_syncs) if cuda and count_syncs else None
    tr.fit()
    seconds = time.perf_counter() - t0
    recs = [json.loads(line) for line in
            (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r and "valid_loss" not in r]
    out = {"rank": tr.rank, "world": tr.world, "losses": [r["loss"] for r in train],
           "tokens_per_s": train[-1]["tokens_per_s"] if train else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "syncs_per_step": counter.per_step() if counter else None,
           "seconds": seconds, "engine": cfg.dist.engine, "vocab": tr.vocab_size,
           "bf16": cfg.train.bf16}
    del tr
    _free()
    return out


def _loss_down(label: str, res: dict) -> dict:
    ls = res["losses"]
    ok = len(ls) >= 2 and all(map(math.isfinite, ls)) and ls[-1] < ls[0]
    return {"name": f"{label}: loss goes down (last logged < first)",
            "value": ls[-1] if ls else math.nan, "unit": "nats", "baseline": ls[0] if ls else None,
            "ok": ok, "losses": ls}


def _train_rows(label: str, res: dict) -> list[dict]:
    na = "n/a"
    rows = [{"name": f"{label}: tokens/s (last interval)", "value": res["tokens_per_s"],
             "unit": "tokens/s"},
            _loss_down(label, res),
            {"name": f"{label}: peak GPU memory",
             "value": na if res["peak_mem_gib"] is None else res["peak_mem_gib"], "unit": "GiB"},
            {"name": f"{label}: host syncs per step",
             "value": na if res["syncs_per_step"] is None else res["syncs_per_step"],
             "unit": "syncs"},
            {"name": f"{label}: wall time (build, steps, validation, checkpoint, test)",
             "value": res["seconds"], "unit": "s"}]
    return rows


def section_train(plan: Plan, ctx: dict) -> list[dict]:
    tmp = Path(ctx["tmp"])
    rows = []
    wt_b, wt_t = (4, 12) if plan.dry else (60, 140)
    wt = zipf_corpus(tmp / "data", plan.wt103_vocab, _corpus_sizes(plan, wt_b, wt_t, 10 if not
                                                                    plan.dry else 2))
    over = _common(plan, tmp / "runs" / "wt103_qrnn", wt, plan.train_steps, plan.log_every)
    res = train_run(str(CONFIGS / "wt103_qrnn_12h.toml"), over, plan.sync_window)
    rows += _train_rows(f"WT-103 QRNN recipe, V={res['vocab']:,}, bf16", res)
    pb, pt = (4, 12) if plan.dry else (20, 70)
    ptb = zipf_corpus(tmp / "data", plan.ptb_vocab, _corpus_sizes(plan, pb, pt, 10 if not
                                                                   plan.dry else 2))
    for bf16 in (False, True):
        over = _common(plan, tmp / "runs" / f"ptb_lstm_{'bf16' if bf16 else 'fp32'}", ptb,
                       plan.train_steps, plan.log_every)
        over["train.bf16"] = bf16
        res = train_run(str(CONFIGS / "ptb_awd_lstm.toml"), over, plan.sync_window)
        rows += _train_rows(f"PTB AWD-LSTM recipe, V={res['vocab']:,}, "
                            f"{'bf16' if bf16 else 'fp32'}", res)
    return rows


# ---------------------------------------------------------------------------------- dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers(out: Path, nproc: int, runs: list[tuple[str, dict]], tmp: Path) -> list[dict]:
    """train_run for each (config, overrides) in turn in child processes: torchrun with nproc
    ranks, or one plain process (the Trainer gives it a process group of one, which the later
    runs reuse); rank 0's results."""
    spec = out.with_suffix(".spec.json")
    write_text_atomic(spec, json.dumps([[c, o] for c, o in runs]))
    args = ["-m", "dist_lm.bench.gpu", "_train", str(out), str(spec)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
               str(_free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    env = dict(os.environ, WANDB_MODE="disabled")
    if nproc > 1 or not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp)
    if p.returncode or not out.is_file():
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {p.returncode}: "
                           f"{(p.stdout + p.stderr)[-2500:]}")
    res = json.loads(out.read_text())
    for r in res:
        r["process_seconds"] = time.perf_counter() - t0
    return res


def _curve_check(label: str, got: dict, ref: dict, rtol: float) -> dict:
    a, b = got["losses"], ref["losses"]
    if len(a) != len(b) or not a:
        diff = math.inf
    else:
        diff = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    return {"name": f"{label}: loss curve vs 1 rank (max rel diff)", "value": diff,
            "unit": "rel", "tolerance": rtol, "ok": diff <= rtol, "losses": a,
            "reference": b}


def section_dist(plan: Plan, ctx: dict) -> list[dict]:
    tmp = Path(ctx["tmp"])
    B, T = (4, 12) if plan.dry else (20, 70)
    data = zipf_corpus(tmp / "data", plan.ptb_vocab, _corpus_sizes(plan, B, T, 2 if plan.dry
                                                                    else 10))
    config = str(CONFIGS / "ptb_awd_lstm.toml")
    # dropout off (masks come from per-rank generators), fp32 without TF32: equal curves
    base = {"model.dropout": 0.0, "model.dropouth": 0.0, "model.dropouti": 0.0,
            "model.dropoute": 0.0, "model.wdrop": 0.0, "train.tf32": False,
            "train.bf16": False}

    def over(name, **kw):
        return {**_common(plan, tmp / "runs" / name, data, plan.dist_steps, 1), **base, **kw}

    rows = []
    ref = train_run(config, over("dist_ref"))
    rows.append({"name": "1 rank local fp32: tokens/s", "value": ref["tokens_per_s"],
                 "unit": "tokens/s", "losses": ref["losses"]})
    gloo, = _workers(tmp / "gloo.json", 2, [(config, over("dist_gloo", **{
        "dist.engine": "ddp", "dist.backend": "gloo"}))], tmp)
    rows.append(_curve_check(f"2 ranks on one {'CPU' if plan.dry else 'GPU'}, DDP over gloo",
                             gloo, ref, LOSS_RTOL))
    backend = "gloo" if plan.dry else "nccl"
    ddp, ds = _workers(tmp / "one.json", 1, [
        (config, over("dist_ddp", **{"dist.engine": "ddp", "dist.backend": backend})),
        (config, over("dist_ds", **{"dist.engine": "deepspeed", "dist.zero_stage": 1,
                                    "dist.backend": backend, "train.bf16": True}))],
        tmp)
    rows.append(_curve_check(f"1-rank DDP on {backend.upper()}", ddp, ref, LOSS_RTOL))
    rows.append(_curve_check("1-rank DeepSpeed ZeRO-1 bf16", ds, ref, LOSS_RTOL_BF16))
    rows.append(_loss_down("1-rank DeepSpeed ZeRO-1 bf16", ds))
    for label, res in (("2 ranks gloo", gloo), ("1-rank DDP", ddp), ("DeepSpeed ZeRO-1", ds)):
        rows.append({"name": f"{label}: tokens/s", "value": res["tokens_per_s"],
                     "unit": "tokens/s", "process_seconds": res["process_seconds"]})
    return rows


# ---------------------------------------------------------------------------------- command

RUNNERS = {"env": section_env, "kernels": section_kernels, "kernel_time": section_kernel_time,
           "train": section_train, "dist": section_dist}


def selected_sections() -> list[str]:
    raw = os.environ.get(SECTIONS_ENV, "").strip()
    if not raw:
        return list(SECTIONS)
    names = [s.strip() for s in raw.split(",") if s.strip()]
    bad = [s for s in names if s not in SECTIONS]
    if bad:
        raise UserError(f"{SECTIONS_ENV} names unknown section(s) {', '.join(bad)}; choose "
                        f"from {', '.join(SECTIONS)}.")
    return [s for s in SECTIONS if s in names]


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return format(v, ".4g")


def format_rows(rows: list[dict]) -> str:
    head = f"{'check / figure':<74} {'value':>16} {'unit':<12} {'baseline':>10} {'ratio':>7}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        ok = "" if "ok" not in r else ("ok" if r["ok"] else "FAIL")
        if "tolerance" in r:
            ok += f" (tol {r['tolerance']:.2g})"
        if "target" in r:
            ok += f" target {r['target_text']}: {'met' if r['target_met'] else 'NOT met'}"
        base = r.get("baseline")
        ratio = r.get("ratio")
        lines.append(f"{r['name'][:74]:<74} {_fmt(r['value'])[:16]:>16} {r['unit']:<12} "
                     f"{'' if base is None else _fmt(base):>10} "
                     f"{'' if ratio is None else format(ratio, '.2f'):>7}  {ok}")
        if r.get("error"):
            lines.append(f"    {r['error'][:300]}")
    return "\n".join(lines)


def run(quick: bool = False, json_path: str | None = None) -> list[dict]:
    """Every selected section (quick = --dry); rows as the other bench groups return them,
    each with its "section". The JSON file, if given, is rewritten after every section."""
    from . import machine_summary

    dry = quick
    plan = Plan(dry)
    sections = selected_sections()
    rows: list[dict] = []
    status: dict[str, dict] = {}
    started = time.time()

    def flush(complete: bool) -> None:
        if not json_path:
            return
        out = {"machine": machine_summary(), "group": "gpu", "dry": dry,
               "seconds": time.time() - started, "complete": complete, "sections": status,
               "failed": [r["name"] for r in rows if r.get("ok") is False], "results": rows}
        write_text_atomic(json_path, json.dumps(out, indent=1, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="dist-lm-bench-gpu-") as tmp:
        ctx = {"tmp": tmp}
        for sec in sections:
            print(f"== bench gpu: {sec}{' (dry: tiny sizes on CPU)' if dry else ''}", flush=True)
            t0 = time.time()
            try:
                got = RUNNERS[sec](plan, ctx)
                state = "done"
            except Exception as exc:  # recorded as a failed check; the other sections still run
                traceback.print_exc()
                got = [{"name": f"{sec}: section ran to its end", "value": type(exc).__name__,
                        "unit": "", "ok": False, "error": str(exc)[-3000:]}]
                state = "error"
            for r in got:
                r["section"] = sec
            rows.extend(got)
            status[sec] = {"status": state, "seconds": time.time() - t0}
            print(format_rows(got), flush=True)
            print(f"({sec}: {status[sec]['seconds']:.1f} s)", flush=True)
            flush(complete=False)
            _free()
    total = time.time() - started
    rows.append({"name": "bench gpu wall time", "value": total, "unit": "s", "section": "total",
                 "target": BUDGET_S, "target_met": total <= BUDGET_S,
                 "target_text": f"<= {BUDGET_S} s"})
    print(format_rows(rows[-1:]), flush=True)
    flush(complete=True)
    return rows


def gpu_command(json_path: str | None = None, dry: bool = False) -> None:
    """`dist-lm bench gpu [--dry] [--json FILE]`: raises UserError naming the failed checks."""
    if not dry and not torch.cuda.is_available():
        raise UserError(f"bench gpu needs a CUDA GPU, and this torch ({torch.__version__}) sees "
                        f"none; run `dist-lm bench gpu --dry` for the CPU rehearsal of every "
                        f"section.")
    selected_sections()  # a bad DIST_LM_BENCH_GPU_SECTIONS fails before anything runs
    t0 = time.time()
    rows = run(quick=dry, json_path=json_path)
    failed = [r["name"] for r in rows if r.get("ok") is False]
    print(f"bench gpu: {len(rows)} rows, {sum('ok' in r for r in rows)} checks, "
          f"{len(failed)} failed, {time.time() - t0:.0f} s", flush=True)
    if failed:
        more = f" (and {len(failed) - 8} more)" if len(failed) > 8 else ""
        raise UserError(f"bench gpu: {len(failed)} check(s) failed: {'; '.join(failed[:8])}"
                        f"{more}; see the table above"
                        + (f" and {json_path}" if json_path else "") + ".")


def _main(argv: list[str]) -> None:
    """Child-process entries: `_kernels OUT` (the --dry kernel checks, under
    TRITON_INTERPRET=1) and `_train OUT SPEC` (train_run for each [config, overrides] of the
    JSON file SPEC; rank 0 writes the list of results)."""
    cmd, out = argv[0], Path(argv[1])
    if cmd == "_kernels":
        rows = kernel_checks(Plan(dry=True), direct=True)
        write_text_atomic(out, json.dumps(rows, default=str))
        return
    if cmd == "_train":
        runs = json.loads(Path(argv[2]).read_text())
        results = [train_run(config, over) for config, over in runs]
        if results[0]["rank"] == 0:
            write_text_atomic(out, json.dumps(results))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return
    raise SystemExit(f"unknown entry {cmd!r}")


if __name__ == "__main__":
    _main(sys.argv[1:])
