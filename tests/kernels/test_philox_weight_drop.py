"""CPU weight drop on Philox bits: the reference generator against Random123's known answers and
Triton's `tl.randint4x`, the C kernel (AVX2 and plain builds) against the reference, and
weight_drop's masks: rate, independence, reproducibility, gradient, thread count, dtypes."""

import ctypes
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.models import within_binomial

from dist_lm.kernels import weight_drop_cpu
from dist_lm.kernels.philox import K, philox4x32, philox_bits, threshold
from dist_lm.models.dropout import philox_drop_reference, weight_drop

needs_kernel = pytest.mark.skipif(weight_drop_cpu.library() is None, reason="no C compiler")


def words(*vals):
    return [torch.tensor([v], dtype=torch.int64) for v in vals]


@pytest.mark.parametrize("ctr,key,expected", [
    # Random123's kat_vectors for philox4x32_10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_reference_philox_gives_the_published_known_answers(ctr, key, expected):
    got = philox4x32(*words(*ctr), *key)
    assert tuple(int(w) for w in got) == expected


def test_philox_bits_layout_is_four_runs_of_k_per_block():
    """Element i takes word o of counter n: block, r = divmod(i, 4K); o, k = divmod(r, K)."""
    seed = 0x123456789ABCDEF
    n = 4 * K * 3 - 5
    bits = philox_bits(n, seed)
    for i in (0, 1, K - 1, K, 2 * K + 3, 4 * K, 4 * K + K + 7, n - 1):
        block, r = divmod(i, 4 * K)
        o, k = divmod(r, K)
        c = block * K + k
        want = philox4x32(*words(c & 0xFFFFFFFF, c >> 32, 0, 0), seed & 0xFFFFFFFF, seed >> 32)[o]
        assert int(bits[i]) == int(want), i


TRITON_SCRIPT = textwrap.dedent("""
    import torch, triton, triton.language as tl
    from dist_lm.kernels.philox import philox4x32

    @triton.jit
    def draw(out, seed, BLOCK: tl.constexpr):
        c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        a, b, d, e = tl.randint4x(seed, c.to(tl.int64) + 4294967290)  # counters past 2**32
        for j, w in enumerate((a, b, d, e)):
            tl.store(out + c * 4 + j, w.to(tl.int64) & 0xFFFFFFFF)

    for seed in (0, 977, 2**62 + 12345):
        out = torch.zeros(128 * 4, dtype=torch.int64)
        draw[(2,)](out, seed, BLOCK=64)
        c = torch.arange(128) + 4294967290
        z = torch.zeros_like(c)
        ref = torch.stack(philox4x32(c & 0xFFFFFFFF, c >> 32, z, z, seed & 0xFFFFFFFF,
                                     seed >> 32), 1).reshape(-1)
        assert torch.equal(out, ref), seed
    print("ok")
""")


@pytest.mark.slow
def test_reference_philox_equals_tritons_randint4x():
    """The same generator, counter and key order as Triton's (and so torch's CUDA) Philox."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


SIZES = [1, 3, K, 4 * K - 1, 4 * K, 4 * K + 1, 70_001, 300_007]
SEEDS = [0, 5, 2**31 + 11, 2**62 + 987_654_321]


@needs_kernel
@pytest.mark.parametrize("n", SIZES)
def test_c_kernel_draws_the_reference_bits(n):
    for seed in SEEDS:
        assert torch.equal(weight_drop_cpu.philox_fill(n, seed), philox_bits(n, seed)), seed


@needs_kernel
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.35, 1 - 2**-20])
def test_c_kernel_weight_drop_equals_the_reference_op(keep):
    torch.manual_seed(0)
    for n in SIZES:
        x = torch.randn(n)
        for seed in SEEDS[:3]:
            got = weight_drop_cpu.weight_drop(x, seed, threshold(keep), 1 / keep)
            assert torch.equal(got, philox_drop_reference(x, seed, keep)), (n, seed)


def test_plain_c_build_without_avx2_draws_the_same_bits(tmp_path):
    """The kernel's portable loop (what a CPU without AVX2 runs) gives the AVX2 path's bits."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    lib = tmp_path / "k.so"
    subprocess.run([cc, "-O3", "-mno-avx2", "-fno-trapping-math", "-fPIC", "-shared",
                    "-std=c99", str(weight_drop_cpu.KERNEL.source), "-o", str(lib), "-lm"],
                   check=True)
    so = ctypes.CDLL(str(lib))
    so.philox_fill.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64,
                               ctypes.c_int64, ctypes.c_int64]
    for n in (5, 4 * K + 9, 10_000):
        for seed in SEEDS:
            bits = torch.zeros(n, dtype=torch.int32)
            so.philox_fill(bits.data_ptr(), n, seed, 0, -(-n // (4 * K)))
            assert torch.equal(bits.to(torch.int64) & 0xFFFFFFFF, philox_bits(n, seed)), (n, seed)


def kept(shape, p, seed=0):
    torch.manual_seed(seed)
    return weight_drop(torch.ones(shape), p, training=True) != 0


@pytest.mark.parametrize("p", [0.5, 0.1, 0.65, 0.001])
def test_weight_drop_keeps_each_element_with_probability_one_minus_p(p):
    m = kept((1000, 2000), p)
    assert within_binomial(int(m.sum()), m.numel(), 1 - p)


def test_weight_drop_mask_has_no_stripes_and_no_correlation():
    """Rows, columns and positions within the 4K-element blocks each keep about half; neighbours
    (inside a run, across runs and across blocks) and the same element of the next block are
    uncorrelated."""
    m = kept((1000, 2048), 0.5).double()
    assert all(within_binomial(int(k), m.size(1), 0.5) for k in m.sum(1))
    assert all(within_binomial(int(k), m.size(0), 0.5) for k in m.sum(0))
    flat = m.reshape(-1)
    by_pos = flat.view(-1, 4 * K).sum(0)
    assert all(within_binomial(int(k), flat.numel() // (4 * K), 0.5) for k in by_pos)
    for lag in (1, K, 4 * K):
        both = int((flat[lag:] * flat[:-lag]).sum())
        assert within_binomial(both, flat.numel() - lag, 0.25), lag


def test_weight_drop_follows_the_default_generator_and_routes_the_gradient():
    w = (torch.rand(300, 70) + 0.5).requires_grad_()
    torch.manual_seed(3)
    a = weight_drop(w, 0.4, True)
    b = weight_drop(w, 0.4, True)
    torch.manual_seed(3)
    assert torch.equal(weight_drop(w, 0.4, True), a)
    assert not torch.equal(a, b)
    g = torch.randn_like(w)
    a.backward(g)
    # the backward recomputes the forward's mask from its seed (b's draw came in between)
    torch.testing.assert_close(w.grad, g * (a != 0) / 0.6, rtol=1e-6, atol=0)


def test_weight_drop_masks_do_not_depend_on_the_thread_count():
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(kept((1550, 401), 0.3, seed=11))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_bf16_weight_drop_drops_what_fp32_drops():
    torch.manual_seed(0)
    w = torch.randn(200, 33)
    torch.manual_seed(5)
    ref = weight_drop(w, 0.5, True)
    torch.manual_seed(5)
    got = weight_drop(w.bfloat16(), 0.5, True)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got != 0, ref != 0)
    torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=0)
