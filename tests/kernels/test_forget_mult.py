"""ForgetMult: the CPU path and the Triton kernels against the plain reference loop."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dist_lm.kernels import forget_mult, forget_mult_reference
from dist_lm.kernels.forget_mult import forget_mult_cpu_backward, forget_mult_cpu_forward

SHAPES = [(1, 1, 1), (1, 3, 4), (5, 1, 7), (9, 4, 6)]


def inputs(T, b, H, dtype=torch.float32, gates="mid", seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(T, b, H, generator=g, dtype=torch.float64)
    if gates == "near0":
        f = f * 1e-3
    elif gates == "near1":
        f = 1 - f * 1e-3
    x = torch.randn(T, b, H, generator=g, dtype=torch.float64)
    h0 = torch.randn(b, H, generator=g, dtype=torch.float64)
    return f.to(dtype), x.to(dtype), h0.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_h0", [True, False])
def test_gradcheck_float64(shape, with_h0):
    f, x, h0 = inputs(*shape, dtype=torch.float64)
    args = (f.requires_grad_(), x.requires_grad_(), h0.requires_grad_() if with_h0 else None)
    assert torch.autograd.gradcheck(forget_mult, args)


@pytest.mark.parametrize("shape", SHAPES + [(70, 2, 33)])
@pytest.mark.parametrize("gates", ["mid", "near0", "near1"])
def test_cpu_path_matches_reference_fp32(shape, gates):
    f, x, h0 = inputs(*shape, gates=gates, seed=1)
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    leaves = [t.clone().requires_grad_() for t in (f, x, h0)]
    out = forget_mult(*leaves)
    out.backward(grad)
    ref_leaves = [t.clone().requires_grad_() for t in (f, x, h0)]
    ref = forget_mult_reference(*ref_leaves)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_zero_initial_state_by_default_and_a_given_state_matters():
    f, x, h0 = inputs(4, 2, 3)
    torch.testing.assert_close(forget_mult(f, x), forget_mult(f, x, torch.zeros(2, 3)))
    assert not torch.allclose(forget_mult(f, x), forget_mult(f, x, h0))


def test_bfloat16_inputs_accumulate_in_fp32():
    f, x, h0 = inputs(50, 2, 8, gates="near0")
    out = forget_mult(f.bfloat16(), x.bfloat16(), h0)
    assert out.dtype == torch.bfloat16
    ref = forget_mult_reference(f.bfloat16().double(), x.bfloat16().double(), h0.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)


def test_custom_op_is_one_op_for_torch_library():
    f, x, h0 = inputs(3, 2, 4)
    torch.library.opcheck(torch.ops.dist_lm.forget_mult.default,
                          (f.requires_grad_(), x, h0), test_utils=("test_schema", "test_faketensor",
                                                                   "test_autograd_registration"))


TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from dist_lm.kernels.forget_mult import forget_mult_cpu_backward, forget_mult_reference
    from dist_lm.kernels.forget_mult_triton import (forget_mult_triton_backward,
                                                    forget_mult_triton_forward)
    torch.manual_seed(0)
    cases = [((1, 1, 1), "mid"), ((1, 3, 5), "mid"), ((6, 1, 3), "near0"), ((7, 3, 300), "mid"),
             ((5, 2, 4), "near1")]
    for (T, b, H), gates in cases:
        f = torch.rand(T, b, H, dtype=torch.float64)
        f = f * 1e-3 if gates == "near0" else (1 - f * 1e-3 if gates == "near1" else f)
        x, h0, grad = torch.randn(T, b, H).double(), torch.randn(b, H).double(), torch.randn(T, b, H)
        leaves = [t.clone().requires_grad_() for t in (f, x, h0)]
        ref = forget_mult_reference(*leaves)
        ref.backward(grad.double())
        out = forget_mult_triton_forward(f.float(), x.float(), h0.float())
        gf, gx, gh0 = forget_mult_triton_backward(grad, f.float(), x.float(), h0.float(), out)
        for got, want in [(out, ref), (gf, leaves[0].grad), (gx, leaves[1].grad), (gh0, leaves[2].grad)]:
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
        for dt in (torch.bfloat16, torch.float16):  # low-precision inputs, fp32 carry
            o = forget_mult_triton_forward(f.to(dt), x.to(dt), h0)
            assert o.dtype == dt
            r = forget_mult_reference(f.to(dt).double(), x.to(dt).double(), h0.double())
            torch.testing.assert_close(o.double(), r, rtol=2e-2, atol=2e-2)
            g = forget_mult_triton_backward(grad.to(dt), f.to(dt), x.to(dt), h0, o)
            assert [t.dtype for t in g] == [dt, dt, torch.float64]
    # the public op (custom op, autograd, h0 = None) on the Triton kernels, as on CUDA: T = 1
    # (a one-token window) and longer, float32 and bfloat16
    from dist_lm.kernels import forget_mult
    calls = []
    def triton_kernel(name, fn):
        def kernel(*args):
            calls.append(name)
            return fn(*args)
        torch.library.register_kernel(f"dist_lm::{name}", "cpu", kernel)
    triton_kernel("forget_mult", forget_mult_triton_forward)
    triton_kernel("forget_mult_backward", forget_mult_triton_backward)
    public = [((1, 2, 3), torch.float32, True), ((1, 1, 1), torch.float32, False),
              ((1, 3, 5), torch.bfloat16, True), ((5, 2, 3), torch.float32, False)]
    for (T, b, H), dt, with_h0 in public:
        f, x = torch.rand(T, b, H).to(dt), torch.randn(T, b, H).to(dt)
        h0, grad = torch.randn(b, H).to(dt) if with_h0 else None, torch.randn(T, b, H).to(dt)
        leaves = [t.clone().requires_grad_() for t in (f, x)] + (
            [h0.clone().requires_grad_()] if with_h0 else [])
        out = forget_mult(*leaves)
        out.backward(grad)
        assert calls == ["forget_mult", "forget_mult_backward"], calls
        calls.clear()
        ref_leaves = [t.double().requires_grad_() for t in (f, x)] + (
            [h0.double().requires_grad_()] if with_h0 else [])
        ref = forget_mult_reference(*ref_leaves)
        ref.backward(grad.double())
        tol = 1e-5 if dt == torch.float32 else 2e-2
        assert out.dtype == dt
        for got, want in [(out, ref)] + [(a.grad, r.grad) for a, r in zip(leaves, ref_leaves)]:
            torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol)
    print("ok")
""")


@pytest.mark.slow
def test_triton_kernels_match_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")  # read when triton.jit decorates the kernels
    res = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


def test_cpu_backward_is_the_reverse_recurrence_not_autograd():
    f, x, h0 = inputs(6, 2, 3, dtype=torch.float64)
    h = forget_mult_cpu_forward(f, x, h0)
    assert not h.requires_grad
    grad = torch.randn_like(h)
    gf, gx, gh0 = forget_mult_cpu_backward(grad, f, x, h0, h)
    leaves = [t.clone().requires_grad_() for t in (f, x, h0)]
    forget_mult_reference(*leaves).backward(grad)
    for a, b in zip((gf, gx, gh0), leaves):
        torch.testing.assert_close(a, b.grad)


def test_torch_compile_captures_one_op_in_a_full_graph():
    f, x, h0 = inputs(4, 2, 3, seed=5)

    def fn(f, x, h0):
        return forget_mult(torch.sigmoid(f), torch.tanh(x), h0)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    leaves = [f.clone().requires_grad_(), x.clone().requires_grad_()]
    got = compiled(*leaves, h0)
    got.sum().backward()
    ref_leaves = [f.clone().requires_grad_(), x.clone().requires_grad_()]
    ref = fn(*ref_leaves, h0)
    ref.sum().backward()
    torch.testing.assert_close(got, ref)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)
