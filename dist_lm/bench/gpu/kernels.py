"""Parts `kernels` and `kernel_speed`: forget-mult and the fused QRNN op.

kernels: each op against an fp64 reference (a plain torch loop, autograd through it) in fp32,
bf16 and fp16, at the recipes' shapes, T = 1, T = 1000 and b*H not a multiple of 16: forward
outputs and every gradient, max |error| / max |reference| per tensor against a per-dtype
tolerance (the fused op's "c" is its fp32 carry c_last = c_{T-1}, [b, H]); a zoneout case (mask,
eval scale, dL/dc_last given); one case per op above 2^31 elements
(bf16, checked on lanes at both ends of the tensor). Each (op, dtype, shape) is its own case.
On the GPU the ops run through their public entry points (the Triton kernels); in the CPU
rehearsal the Triton kernels are called directly under TRITON_INTERPRET=1 on CPU tensors.

kernel_speed: forward and backward time of both kernels against the bytes they must move (every
[T, b, H] pass in the activation dtype plus the fp32 [b, H] states each kernel reads or writes),
as a fraction of a device-to-device copy of as many bytes (the bandwidth ceiling; target: the
fused op at the WT-103 shape >= 60 %), and forward + backward through autograd against the unfused
path (the torch sequence the fused op replaced, forget-mult's step-by-step loop). On the CPU
the C kernels are timed (fp32).
"""

from __future__ import annotations

import math

import torch

from .common import DT_NAME, DTYPES, FUSED_TARGET, TOLERANCE, Plan, free, median_timer, tol_scale

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


def verdict(name: str, errors: dict[str, float], dtype, scale: float, **extra) -> dict:
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
        from ...kernels.forget_mult_triton import (forget_mult_triton_backward,
                                                  forget_mult_triton_forward)

        h = forget_mult_triton_forward(f, x, h0)
        return (h, *forget_mult_triton_backward(gh, f, x, h0, h))
    from ...kernels import forget_mult

    leaves = [t.detach().requires_grad_() for t in (f, x, h0)]
    h = forget_mult(*leaves)
    grads = torch.autograd.grad(h, leaves, gh)
    return (h.detach(), *grads)


def _fused_run(y, c0, mask, scale, gh, gc, direct: bool):
    """h, c_last, dy, dc0 of the fused op (see _forget_run for `direct`); gc is dL/dc_last."""
    if direct:
        from ...kernels.qrnn_fused_triton import (qrnn_fused_triton_backward,
                                                 qrnn_fused_triton_forward)

        h, c, c_last = qrnn_fused_triton_forward(y, c0, mask, scale)
        return (h, c_last, *qrnn_fused_triton_backward(gh, gc, y, c0, mask, c, scale))
    from ...kernels import qrnn_fused

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
    return verdict(f"forget_mult {DT_NAME[dtype]} T={T} b={b} H={H}{where}", errors, dtype,
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
    gc = torch.randn(b, H, device=dev, generator=g) if zoneout else None  # dL/dc_last, fp32
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
    crr = crr[-1]  # the carry the op returns
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
    what = " zoneout mask, scale 0.9, dL/dc_last" if zoneout else ""
    where = "" if cols is None else f", rows 0/{b - 1} x {len(cols)} columns at both ends"
    return verdict(f"qrnn_fused {DT_NAME[dtype]} T={T} b={b} H={H}{what}{where}", errors,
                    dtype, scale, elements=T * b * 3 * H)


def big_case(label: str, fn, shape, need: int, plan: Plan, direct: bool, seed: int) -> dict:
    """A bf16 case above 2^31 elements, skipped (not failed) when the GPU lacks the memory."""
    dev = plan.device
    free_b = torch.cuda.mem_get_info()[0] if dev == "cuda" else need * 2
    if free_b < 1.2 * need:
        return {"name": f"{label} bf16 T, b, H = {shape} (above 2^31 elements)",
                "value": "skipped", "unit": "",
                "error": f"needs {need / 2**30:.0f} GiB of GPU memory, {free_b / 2**30:.0f} GiB "
                         f"free"}
    return fn(shape, torch.bfloat16, dev, direct, tol_scale(), lanes_k=plan.big_lanes, seed=seed)


def _one(fn, *args, **kw):
    def case():
        row = fn(*args, scale=tol_scale(), **kw)
        free()
        return [row]
    return case


def cases(plan: Plan, ctx) -> list[tuple[str, object]]:
    """Every kernel case of the plan, each its own case (a failure or a crash loses no other)."""
    dev, direct = plan.device, plan.dry
    out = []
    for i, shape in enumerate(plan.kernel_shapes):
        for dt in DTYPES:
            tag = f"{DT_NAME[dt]} T={shape[0]} b={shape[1]} H={shape[2]}"
            out.append((f"forget_mult {tag}",
                        _one(check_forget_mult, shape, dt, dev, direct, seed=i)))
            out.append((f"qrnn_fused {tag}", _one(check_fused, shape, dt, dev, direct, seed=i)))
    for dt in DTYPES:
        out.append((f"qrnn_fused {DT_NAME[dt]} zoneout",
                    _one(check_fused, plan.zoneout_shape, dt, dev, direct, zoneout=True,
                         seed=7)))
    # above 2^31 elements: bf16 (the recipe's dtype), lanes at both ends compared. Memory:
    # forget-mult f, x, dL/dh, h, df, dx; the fused op y, dy (3 H wide), h, c, dL/dh
    T, b, H = plan.big_forget
    out.append(("forget_mult above 2^31", lambda: [big_case(
        "forget_mult", check_forget_mult, plan.big_forget, 6 * T * b * H * 2, plan, direct, 11)]))
    T, b, H = plan.big_fused
    out.append(("qrnn_fused above 2^31", lambda: [big_case(
        "qrnn_fused", check_fused, plan.big_fused, 9 * T * b * H * 2, plan, direct, 12)]))
    return out


# ---------------------------------------------------------------------------------- speed


def kernel_fns(device: torch.device):
    """(forget fwd, forget bwd, fused fwd, fused bwd) kernel entry points: Triton on CUDA, the
    CPU paths (fp32; the fused op's C kernel) on the CPU."""
    if device.type == "cuda":
        from ...kernels.forget_mult_triton import (forget_mult_triton_backward as fb,
                                                   forget_mult_triton_forward as ff)
        from ...kernels.qrnn_fused_triton import (qrnn_fused_triton_backward as qb,
                                                  qrnn_fused_triton_forward as qf)
        return ff, fb, qf, qb
    from ...kernels import qrnn_fused_cpu
    from ...kernels.forget_mult import forget_mult_cpu_backward as fb
    from ...kernels.forget_mult import forget_mult_cpu_forward as ff

    if qrnn_fused_cpu.library() is None:
        raise RuntimeError("the CPU QRNN kernel did not build (no C compiler?)")
    return ff, fb, qrnn_fused_cpu.forward, qrnn_fused_cpu.backward


def _inputs(shape, dt, dev):
    T, b, H = shape
    g = torch.Generator(device=dev).manual_seed(0)
    f = torch.rand(T, b, H, device=dev, generator=g).to(dt)
    x = torch.randn(T, b, H, device=dev, generator=g).to(dt)
    h0 = torch.randn(b, H, device=dev, generator=g)
    gh = torch.randn(T, b, H, device=dev, generator=g).to(dt)
    y = (torch.randn(T, b, 3 * H, device=dev, generator=g) * 2).to(dt)
    return f, x, h0, gh, y


def bandwidth_rows(plan: Plan, shape) -> list[dict]:
    """Each kernel's time and GB/s against a copy of as many bytes, timed in the same case."""
    dev = torch.device(plan.device)
    dt = plan.time_dtype
    es = torch.empty((), dtype=dt).element_size()
    median = median_timer(dev)
    ff, fb, qf, qb = kernel_fns(dev)
    T, b, H = shape
    n = T * b * H
    f, x, h0, gh, y = _inputs(shape, dt, dev)
    h = ff(f, x, h0)
    c = qf(y, h0, None, 1.0)[1]  # the saved cell states, in dt (the CPU kernel's: fp32)
    ces = c.element_size()
    # bytes each kernel must read and write: [T, b, H] passes in dt, c's passes in c's dtype,
    # and the fp32 [b, H] states (h0/c0 read; the fused op's carry c_last written forward,
    # dL/dh0, dL/dc0 written backward). forget fwd f, x -> h; bwd dh, f, x, h -> df, dx;
    # fused fwd y (3) -> h, c, c_last; fused bwd dh, y (3), c -> dy (3), dc0
    bh4 = b * H * 4
    kern = [("forget_mult fwd", lambda: ff(f, x, h0), 3 * n * es + bh4),
            ("forget_mult bwd", lambda: fb(gh, f, x, h0, h), 6 * n * es + 2 * bh4),
            ("qrnn_fused fwd", lambda: qf(y, h0, None, 1.0), 4 * n * es + n * ces + 2 * bh4),
            ("qrnn_fused bwd", lambda: qb(gh, None, y, h0, None, c, 1.0),
             7 * n * es + n * ces + 2 * bh4)]
    rows = []
    for name, fn, nbytes in kern:
        src = torch.empty(-(-nbytes // es), dtype=dt, device=dev)  # as many bytes, rounded up
        dst = torch.empty_like(src)
        t_k = median(fn, plan.time_reps, plan.time_calls)
        t_c = median(lambda: dst.copy_(src), plan.time_reps, plan.time_calls)
        bw, copy_bw = nbytes / t_k / 1e9, 2 * src.numel() * es / t_c / 1e9
        label = f"{name} {DT_NAME[dt]} T={T} b={b} H={H}"
        row = {"name": label + " bandwidth vs copy", "value": bw, "unit": "GB/s",
               "baseline": copy_bw, "ratio": bw / copy_bw, "ms": t_k * 1e3, "bytes": nbytes}
        if name.startswith("qrnn_fused") and (T, b, H) == (140, 60, 2500):
            row.update(target=FUSED_TARGET, target_met=bw / copy_bw >= FUSED_TARGET,
                       target_text=f">= {FUSED_TARGET:.0%} of the copy")
        rows += [{"name": label, "value": t_k * 1e3, "unit": "ms"}, row]
        del src, dst
    free()
    return rows


def unfused_rows(plan: Plan, shape) -> list[dict]:
    """Forward + backward through autograd: each op against its unfused path."""
    from ...kernels import forget_mult, forget_mult_reference, qrnn_fused, qrnn_fused_reference

    dev = torch.device(plan.device)
    dt = plan.time_dtype
    median = median_timer(dev)
    T, b, H = shape
    f, x, h0, gh, y = _inputs(shape, dt, dev)
    leaves = [t.requires_grad_() for t in (f, x, y)]

    def fb(op, *args):
        def run():
            out = op(*args)
            out = out[0] if isinstance(out, tuple) else out
            torch.autograd.grad(out, [a for a in args if torch.is_tensor(a) and a.requires_grad],
                                gh)
        return run

    pairs = [("forget_mult", fb(forget_mult, leaves[0], leaves[1], h0),
              fb(forget_mult_reference, leaves[0], leaves[1], h0)),
             ("qrnn_fused", fb(qrnn_fused, leaves[2], h0, None, 1.0),
              fb(qrnn_fused_reference, leaves[2], h0, None, 1.0))]
    rows = []
    reps = max(3, plan.time_reps // 3)
    for name, fused, ref in pairs:
        t_f = median(fused, reps, 1)
        t_r = median(ref, reps, 1)
        rows.append({"name": f"{name} fwd+bwd {DT_NAME[dt]} T={T} b={b} H={H} vs unfused path",
                     "value": t_f * 1e3, "unit": "ms", "baseline": t_r * 1e3,
                     "ratio": t_r / t_f if t_f > 0 else math.inf})
    free()
    return rows


def speed_cases(plan: Plan, ctx) -> list[tuple[str, object]]:
    out = []
    for shape in plan.time_shapes:
        tag = "T={} b={} H={}".format(*shape)
        out.append((f"bandwidth {tag}", lambda s=shape: bandwidth_rows(plan, s)))
        out.append((f"unfused {tag}", lambda s=shape: unfused_rows(plan, s)))
    return out
