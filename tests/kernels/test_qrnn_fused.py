"""The fused QRNN op (gates + zoneout + forget-mult + output gate) against the unfused reference:
its C kernel on CPU, its Triton kernels under TRITON_INTERPRET=1, and the Triton kernels'
vectorised memory access in the PTX they compile to."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dist_lm.kernels import qrnn_fused_cpu
from dist_lm.kernels.qrnn_fused import qrnn_fused, qrnn_fused_reference

# (T, b, H): T = 1, b*H = 1, 15, 14, 34 (none a multiple of 16), one larger
SHAPES = [(1, 1, 1), (1, 3, 5), (4, 2, 7), (6, 2, 17), (11, 3, 40)]


def case(T, b, H, gates="mid", zoneout=False, seed=0, dtype=torch.float32):
    """y, c0, mask, dL/dh, dL/dc_last ([b, H]). gates='edge': pre-activations of +-10 (sigmoid
    within 5e-5 of 0 or 1, tanh saturated) mixed with ordinary ones."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(T, b, 3 * H, generator=g, dtype=torch.float64) * 2
    if gates == "edge":
        sign = torch.randint(0, 2, y.shape, generator=g) * 2 - 1
        y = torch.where(torch.rand(y.shape, generator=g) < 0.7, 10.0 * sign, y)
    c0 = torch.randn(b, H, generator=g, dtype=torch.float64)
    mask = torch.rand(T, b, H, generator=g) < 0.75 if zoneout else None
    gh = torch.randn(T, b, H, generator=g, dtype=torch.float64)
    gc = torch.randn(b, H, generator=g, dtype=torch.float64)
    return y.to(dtype), c0.to(dtype), mask, gh.to(dtype), gc.to(dtype)


def run(fn, y, c0, mask, scale, gh, gc, with_c0=True, c_grad=True):
    y = y.clone().requires_grad_()
    c0 = c0.clone().requires_grad_() if with_c0 else None
    h, c = fn(y, c0, mask, scale)
    loss = (h * gh).sum() + ((c * gc).sum() if c_grad else 0)
    loss.backward()
    return h.detach(), c.detach(), y.grad, None if c0 is None else c0.grad


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("zoneout", [False, True])
def test_gradcheck_float64_reference(shape, zoneout):
    y, c0, mask, _, _ = case(*shape, zoneout=zoneout, dtype=torch.float64)
    fn = lambda y, c0: qrnn_fused_reference(y, c0, mask, 1.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (y.requires_grad_(), c0.requires_grad_()))


def test_float64_takes_the_reference_path_and_passes_gradcheck():
    y, c0, mask, _, _ = case(3, 2, 5, zoneout=True, dtype=torch.float64)
    fn = lambda y, c0: qrnn_fused(y, c0, mask, 0.8)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (y.requires_grad_(), c0.requires_grad_()))


def test_reference_is_the_gate_by_gate_recurrence():
    y, c0, mask, _, _ = case(5, 2, 3, zoneout=True, dtype=torch.float64)
    h, c_last = qrnn_fused_reference(y, c0, mask, 0.9)
    z, f, o = y.tanh()[..., :3], y.sigmoid()[..., 3:6] * mask * 0.9, y.sigmoid()[..., 6:]
    prev = c0
    for t in range(5):
        prev = f[t] * z[t] + (1 - f[t]) * prev
        torch.testing.assert_close(h[t], o[t] * prev)
    torch.testing.assert_close(c_last, prev)


@pytest.mark.parametrize("fn", [qrnn_fused, qrnn_fused_reference])
def test_an_empty_window_hands_its_carry_on(fn):
    """T = 0 (an epoch's empty tail): no output, c0 comes back as the carry (at least fp32) and
    dL/dc_last flows back to c0 unchanged."""
    _, c0, _, _, gc = case(1, 2, 5)
    c0 = c0.bfloat16().requires_grad_()
    h, c_last = fn(torch.zeros(0, 2, 15, dtype=torch.bfloat16), c0)
    assert h.shape == (0, 2, 5) and c_last.dtype == torch.float32
    assert torch.equal(c_last, c0.detach().float())
    (g,) = torch.autograd.grad(c_last, c0, gc)
    assert torch.equal(g, gc.bfloat16())


@pytest.mark.parametrize("shape", SHAPES + [(70, 4, 150)])
@pytest.mark.parametrize("gates", ["mid", "edge"])
@pytest.mark.parametrize("zoneout,scale", [(False, 1.0), (True, 1.0), (False, 0.7)])
def test_cpu_kernel_matches_reference(shape, gates, zoneout, scale):
    assert qrnn_fused_cpu.library() is not None  # a C compiler is part of the test machine
    y, c0, mask, gh, gc = case(*shape, gates=gates, zoneout=zoneout, seed=3)
    for with_c0, c_grad in [(True, True), (False, False)]:
        got = run(qrnn_fused, y, c0, mask, scale, gh, gc, with_c0, c_grad)
        want = run(qrnn_fused_reference, y, c0, mask, scale, gh, gc, with_c0, c_grad)
        for a, b in zip(got, want):
            if b is None:
                assert a is None
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


def test_cpu_kernel_is_the_one_running(monkeypatch):
    """The C path really runs (not a silent fallback), and the fallback gives the same answer."""
    y, c0, mask, gh, gc = case(6, 2, 17, zoneout=True, seed=4)
    yy = y.clone().requires_grad_()
    h, _ = qrnn_fused(yy, c0, mask)
    assert type(h.grad_fn).__name__ == "_FusedCPUBackward"
    got = run(qrnn_fused, y, c0, mask, 1.0, gh, gc)
    assert [t.shape for t in got] == [(6, 2, 17), (2, 17), (6, 2, 51), (2, 17)]
    monkeypatch.setattr(qrnn_fused_cpu, "library", lambda: None)
    h, _ = qrnn_fused(yy, c0, mask)
    assert type(h.grad_fn).__name__ != "_FusedCPUBackward"
    for a, b in zip(got, run(qrnn_fused, y, c0, mask, 1.0, gh, gc)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


def test_cpu_kernel_splits_lanes_over_threads():
    y, c0, mask, gh, gc = case(5, 3, 700, zoneout=True, seed=5)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(qrnn_fused, y, c0, mask, 1.0, gh, gc)
        torch.set_num_threads(4)  # 3 rows over 4 threads: column ranges of each row
        four = run(qrnn_fused, y, c0, mask, 1.0, gh, gc)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, four):
        assert torch.equal(a, b)


def test_cpu_kernel_builds_into_the_cache_dir_and_falls_back_without_a_compiler(tmp_path,
                                                                                monkeypatch):
    monkeypatch.setenv("DIST_LM_CACHE", str(tmp_path / "cache"))
    assert qrnn_fused_cpu.KERNEL.build() is not None
    assert [p.name.startswith("qrnn_fused-") for p in (tmp_path / "cache").iterdir()] == [True]
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("DIST_LM_CACHE", str(tmp_path / "other"))
    with pytest.raises(OSError):  # library() turns this into a warning and the torch path
        qrnn_fused_cpu.KERNEL.build()
    monkeypatch.setenv("CC", "false")
    with pytest.warns(UserWarning, match="did not build"):
        assert qrnn_fused_cpu.KERNEL.build() is None


TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from dist_lm.kernels.qrnn_fused import _FusedTriton, qrnn_fused_reference
    from tests_case import case, run
    n = 0
    # H = 300: two column blocks, the second ragged
    for shape, combos in [((1, 1, 1), "abcd"), ((1, 3, 5), "bd"), ((4, 2, 7), "abcd"),
                          ((6, 2, 17), "bc"), ((3, 2, 300), "b")]:
        for gates, zoneout, scale in [{"a": ("mid", False, 1.0), "b": ("edge", True, 1.0),
                                       "c": ("mid", True, 1.0), "d": ("edge", False, 0.7)}[k]
                                      for k in combos]:
            y, c0, mask, gh, gc = case(*shape, gates=gates, zoneout=zoneout, seed=n)
            for c_grad in (True, False):
                want = run(qrnn_fused_reference, y.double(), c0.double(), mask, scale,
                           gh.double(), gc.double(), True, c_grad)
                got = run(_FusedTriton.apply, y, c0, mask, scale, gh, gc, True, c_grad)
                for a, b in zip(got, want):
                    assert a.dtype == torch.float32
                    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
            if zoneout:  # the same mask as 0/1 floats (what bernoulli_ draws on a GPU)
                got = run(_FusedTriton.apply, y, c0, mask.float(), scale, gh, gc, True, False)
                for a, b in zip(got, want):
                    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
            for dt in (torch.bfloat16, torch.float16)[:1 + n % 2]:  # 16-bit I/O, fp32 carry
                yl, ghl = y.to(dt), gh.to(dt)  # dL/dc_last stays fp32, as the carry's grad is
                want = run(qrnn_fused_reference, yl.double(), c0.double(), mask, scale,
                           ghl.double(), gc.double())
                got = run(_FusedTriton.apply, yl, c0, mask, scale, ghl, gc)
                assert [t.dtype for t in got] == [dt, torch.float32, dt, torch.float32]
                for a, b in zip(got, want):
                    torch.testing.assert_close(a.double(), b, rtol=3e-2, atol=3e-2)
                # the carry is the fp32 register state, not its rounding: within fp32 error of
                # the fp64 recurrence on the same 16-bit gates; the saved c[-1] is its rounding
                # to dt (within one ulp: the interpreter truncates to bf16, a GPU rounds)
                torch.testing.assert_close(got[1].double(), want[1], rtol=1e-5, atol=1e-5)
                h, c_last = _FusedTriton.apply(yl.detach().requires_grad_(), c0, mask, scale)
                c = h.grad_fn.saved_tensors[3]  # the cell states the backward reads
                assert c.dtype == dt and c.shape == h.shape and c_last.shape == c0.shape
                torch.testing.assert_close(c[-1].float(), c_last.detach(), atol=0,
                                           rtol=torch.finfo(dt).eps)
            n += 1
    print("ok", n)
""")


@pytest.mark.slow
def test_triton_kernels_match_reference_under_interpreter(tmp_path):
    (tmp_path / "tests_case.py").write_text(
        "import torch\n" + textwrap.dedent(__import__("inspect").getsource(case)) + "\n"
        + textwrap.dedent(__import__("inspect").getsource(run)))
    env = dict(os.environ, TRITON_INTERPRET="1",  # read when triton.jit decorates the kernels
               PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    res = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "ok 13", res.stdout + res.stderr


PTX_SCRIPT = textwrap.dedent("""
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from dist_lm.kernels import forget_mult_triton as fm, qrnn_fused_triton as qf

    def accesses(fn, sig, consts, n_ptr, num_warps):
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(n_ptr)}  # torch's allocations
        src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": num_warps}).asm["ptx"]
        return set(re.findall(r"(?:ld|st)\\.global[.\\w]*", ptx))

    fp = lambda names, t: {k: t for k in names.split()}
    fwd = {**fp("F X H0 OUT", "*fp32"), "T": "i32", "N_DIV": "i32", "ALIGN": "constexpr",
           "BLOCK": "constexpr"}
    bwd = {**fp("GH F X H0 H GF GX GH0", "*fp32"), "T": "i32", "N_DIV": "i32",
           "ALIGN": "constexpr", "BLOCK": "constexpr"}
    qfwd = {**fp("Y C0 M HOUT C CLAST", "*fp32"), "M": "*u8", "T": "i32", "B": "i32",
            "H_DIV": "i32",
            "scale": "fp32", "HAS_MASK": "constexpr", "ALIGN": "constexpr", "BLOCK": "constexpr"}
    qbwd = {**fp("GH GC Y C0 M C DY DC0", "*fp32"), "M": "*u8", "T": "i32", "B": "i32",
            "H_DIV": "i32", "scale": "fp32", "HAS_MASK": "constexpr", "HAS_GC": "constexpr",
            "ALIGN": "constexpr", "BLOCK": "constexpr"}
    vec = {"ld.global.v4.b32", "st.global.v4.b32"}
    # b*H = 20*1150 (a multiple of 8, not 16) and H = 1550 (of 2) / 1548 (of 4)
    a = fm.pow2_divisor(20 * 1150)
    assert a == 8
    one = {"ALIGN": 1, "BLOCK": fm.BLOCK}
    assert accesses(fm._forget_mult_fwd, fwd, one, 4, 4) == {"ld.global.b32", "st.global.b32"}
    got = accesses(fm._forget_mult_fwd, fwd, {"ALIGN": a, "BLOCK": fm.BLOCK}, 4, 4)
    assert got == vec, got
    got = accesses(fm._forget_mult_bwd, bwd, {"ALIGN": a, "BLOCK": fm.BLOCK}, 8, 4)
    assert got == vec, got
    c = {"HAS_MASK": False, "ALIGN": fm.pow2_divisor(1548), "BLOCK": qf.BLOCK}
    got = accesses(qf._qrnn_fwd, qfwd, c, 6, qf.NUM_WARPS)
    assert got == vec, got
    got = accesses(qf._qrnn_bwd, qbwd, {**c, "HAS_GC": True}, 8, qf.NUM_WARPS)
    assert got == vec, got
    print("ok")
""")


@pytest.mark.slow
def test_triton_kernels_compile_to_vector_loads_when_bh_is_not_a_multiple_of_16():
    """Compiled for sm_90 without a GPU (Triton's own ptxas): every global load and store of
    both forget-mult kernels at b*H = 23000 and of the fused kernels at H = 1548 is a 16-byte
    vector access; declaring no alignment (ALIGN=1, what the kernels did before) gives scalar
    ones."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-c", PTX_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


def test_unfused_switch_runs_the_reference_inside_the_block_only():
    from dist_lm.kernels.qrnn_fused import unfused

    y, c0, _, _, _ = case(3, 2, 5)
    y.requires_grad_()
    with unfused():
        h, _ = qrnn_fused(y, c0)
        assert type(h.grad_fn).__name__ == "MulBackward0"  # sigmoid(o) * c of the reference
    h2, _ = qrnn_fused(y, c0)
    assert type(h2.grad_fn).__name__ == "_FusedCPUBackward"
    torch.testing.assert_close(h, h2, rtol=1e-5, atol=1e-6)


def _forked_child(queue):
    torch.set_num_threads(2)  # the parent's pool exists; its threads do not in here
    y, c0, mask, gh, gc = case(4, 3, 700, zoneout=True, seed=6)
    h, _ = qrnn_fused(y, c0, mask)
    queue.put(float(h.sum()))


def test_cpu_kernel_runs_in_a_forked_child():
    import multiprocessing as mp

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y, c0, mask, _, _ = case(4, 3, 700, zoneout=True, seed=6)
        want = float(qrnn_fused(y, c0, mask)[0].sum())  # the parent's pool is created here
    finally:
        torch.set_num_threads(old)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_forked_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung (a stale thread pool)")
    assert child.exitcode == 0 and queue.get(timeout=5) == want
