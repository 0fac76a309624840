"""Compile every Triton kernel variant the wrappers launch, for sm_90, without a GPU.

    python tests/kernels/_triton_compile.py OUT.json     (TRITON_INTERPRET unset)

The wrappers (forget_mult_triton_*, qrnn_fused_triton_*) run on CPU tensors over the argument
combinations the ops pass them: dtypes, h0/c0 in the input dtype or fp32 (an fp32 carry),
zoneout masks (none, bool, 0/1 floats of y's dtype), dL/dc_last or none, T = 1, 16, 17, 140, row
lengths of every alignment the kernels declare, a carry that is a misaligned view. Their
launches go through Triton's own JIT entry (JITFunction.run, with warmup=True: bind, specialize,
compile, no launch), with the active driver replaced by one that answers "device 0 of an sm_90
GPU": so each variant is the one the JIT would build on an H100, from the real launch
arguments, and is compiled to a cubin by Triton's compiler and ptxas.

Writes a JSON report: the Triton version, the JIT functions of each kernel module (their
source), and per launched kernel every launch (its case, T, arguments, and the variant it
compiled to or its compile error) and the variants (signature, constexprs). Run by
tests/kernels/test_triton_compile.py, once with the test machine's Triton and once with the device
image's (on PYTHONPATH).
"""

from __future__ import annotations

import itertools
import json
import sys
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from dist_lm.kernels import forget_mult_triton as fm
from dist_lm.kernels import qrnn_fused_triton as qf

MODULES = (fm, qf)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
T_VALUES = (1, 16, 17, 140)  # T = 1 (an int 1 is a constant to Triton), multiples of 16 and not


class OfflineH100:
    """The three questions JITFunction.run asks the active driver, answered for an sm_90 GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def jit_functions(module):
    return {name: obj for name, obj in vars(module).items() if isinstance(obj, JITFunction)}


CASE = {}  # the launch generators' current case: a label of all but T, and T


def record(fn, report):
    """Make fn[grid](...) compile the variant the JIT would build for these arguments (and not
    launch it), and record the launch in report[fn.__name__]: its case, T, and the variant it
    got (the compiled kernel's hash) or the compile error."""
    entry = report.setdefault(fn.__name__, {"launches": [], "variants": {}})
    run = fn.run

    def compile_only(*args, grid, warmup, **kwargs):
        launch = {**CASE, "args": describe(args, kwargs)}
        entry["launches"].append(launch)
        try:
            kernel = run(*args, grid=grid, warmup=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported with the arguments that caused it
            launch["error"] = "".join(traceback.format_exception_only(type(exc), exc))[-3000:]
            return
        launch["variant"] = kernel.hash
        entry["variants"][kernel.hash] = {
            "signature": kernel.src.signature,
            "constexprs": {str(k): repr(v) for k, v in kernel.src.constants.items()}}

    fn.run = compile_only


def describe(args, kwargs):
    def one(a):
        if isinstance(a, torch.Tensor):
            return f"{str(a.dtype).removeprefix('torch.')}{list(a.shape)}@{a.data_ptr() % 16}"
        return repr(a)
    return [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]


def tensor(shape, dtype, misaligned=False):
    """torch.empty of shape, or a view of it 1 element into a larger buffer (a pointer that
    is not 16-byte aligned, as a carry sliced out of a larger tensor is)."""
    if not misaligned:
        return torch.empty(shape, dtype=dtype)
    n = 1
    for s in shape:
        n *= s
    return torch.empty(n + 1, dtype=dtype)[1:].view(shape)


# (b, H): b*H (forget-mult) and H (fused QRNN) of every alignment the kernels declare
# (pow2_divisor: 1, 2, 4, 8, 16), none but the last a multiple of 16, and b = 1
SHAPES = [(1, 1), (3, 6), (5, 20), (20, 1150), (2, 48)]


def forget_mult_launches():
    for i, (dt, h0_dt) in enumerate(itertools.product(DTYPES, (None, torch.float32))):
        h0_dt = h0_dt or dt
        b, H = SHAPES[i % len(SHAPES)]
        for T in T_VALUES:
            CASE.update(case=f"{dt} h0 {h0_dt}{' misaligned' * (i == 1)} {b}x{H}", T=T)
            f, x = tensor((T, b, H), dt), tensor((T, b, H), dt)
            h0 = tensor((b, H), h0_dt, misaligned=i == 1)
            h = fm.forget_mult_triton_forward(f, x, h0)
            fm.forget_mult_triton_backward(tensor((T, b, H), dt), f, x, h0, h)


def qrnn_launches():
    masks = (None, torch.bool, "y")  # y: 0/1 floats of y's dtype (bernoulli_ on a GPU)
    for i, (dt, c0_dt, mk) in enumerate(itertools.product(DTYPES, (None, torch.float32), masks)):
        c0_dt = c0_dt or dt
        b, H = SHAPES[i % len(SHAPES)]
        for T in T_VALUES:
            CASE.update(case=f"{dt} c0 {c0_dt}{' misaligned' * (i == 4)} mask {mk} {b}x{H}", T=T)
            y = tensor((T, b, 3 * H), dt)
            c0 = tensor((b, H), c0_dt, misaligned=i == 4)
            mask = None if mk is None else tensor((T, b, H), dt if mk == "y" else mk)
            scale = 1.0 if mask is not None else 0.75
            h, c, c_last = qf.qrnn_fused_triton_forward(y, c0, mask, scale)
            for gc in (None, torch.empty_like(c_last)):  # the carry without and with a gradient
                qf.qrnn_fused_triton_backward(torch.empty_like(h), gc, y, c0, mask, c, scale)


def main(out_path: str) -> None:
    driver.set_active(OfflineH100())
    report = {"triton": triton.__version__, "modules": {}, "kernels": {}}
    for module in MODULES:
        fns = jit_functions(module)
        report["modules"][module.__name__] = {
            name: fn.src for name, fn in fns.items()}  # source, to tell kernels from helpers
        for fn in fns.values():
            record(fn, report["kernels"])
    forget_mult_launches()
    qrnn_launches()
    report["kernels"] = {k: v for k, v in report["kernels"].items() if v["launches"]}
    with open(out_path, "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
