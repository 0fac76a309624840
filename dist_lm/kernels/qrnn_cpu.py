"""CPU kernels in one small C library, compiled once per machine, called by ctypes: the fused
QRNN step (below), weight drop on Philox bits (`weight_drop`, kernels/philox.py) and the
softmax loss (`softmax_nll_forward` / `_backward`, used by models/heads.py's softmax_nll).

One pass over T per lane forward (gate nonlinearities, zoneout mask, recurrence, output gate) and
one backward (the gates recomputed from the pre-activations, the reverse recurrence, all three
gate gradients written straight into the [T, b, 3H] input gradient): forward reads y and the
mask and writes h and c, backward reads dL/dh, y, c, the mask and writes dL/dy. Unfused, the
same work is about twenty torch ops on [T, b, H] tensors plus one or five single-threaded ops per
step of the recurrence, each streaming through memory; here a lane's row of H floats stays in
L1 from one step to the next. exp is the kernel's own (vectorisable) polynomial, within a few
ulp of torch's sigmoid and tanh.

The C source has no torch headers: gcc builds it in about a second into
$DIST_LM_CACHE (default ~/.cache/dist_lm) under a name hashed from the source, the flags and
the CPU, written to a temporary name and renamed into place. Without a C compiler (or on a
failed build) `library()` returns None and each caller uses its torch path (the same masks
for weight drop); nothing else changes. Lanes (rows, blocks) are split over
torch.get_num_threads() Python threads (ctypes releases the GIL during a call).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

/* exp(x) for the gates, written so that gcc vectorises the loops that call it (libm's expf
   does not vectorise without -ffast-math): x = n ln2 + r, |r| <= ln2/2, e^r by a degree-7
   Taylor polynomial (relative error < 1e-8 before rounding, about 2 ulp in all), times 2^n
   assembled in the exponent bits. x is clamped to [-87, 87]: 2^n stays a normal float. */
static inline float exp_gate(float x)
{
    x = x < -87.0f ? -87.0f : (x > 87.0f ? 87.0f : x);  /* fminf/fmaxf do not vectorise */
    float n = floorf(x * 1.44269504f + 0.5f);
    float r = x - n * 0.693145752f - n * 1.42860677e-6f;  /* ln2 split in two for exactness */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666667e-1f + r * (4.16666667e-2f
              + r * (8.33333333e-3f + r * (1.38888889e-3f + r * 1.98412698e-4f))))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid_gate(float x) { return 1.0f / (1.0f + exp_gate(-x)); }
static inline float tanh_gate(float x) { return 2.0f * sigmoid_gate(2.0f * x) - 1.0f; }

/* Rows b0..b1-1 and columns j0..j1-1 of y: [T, B, 3H] pre-activations (z | f | o) -> c, h:
   [T, B, H]. mask: [T, B, H] bytes (0/1) or 0. z = tanh, f = sigmoid * scale * mask,
   o = sigmoid; c_t = c_{t-1} + f (z - c_{t-1}), h_t = o c_t. One loop per mask/no-mask case
   (the macros), so that each is a plain vectorisable loop. */
#define FWD_LANES(KEEP)                                                   \
    _Pragma("GCC ivdep") /* the rows never overlap (restrict on locals is not enough) */ \
    for (int64_t j = j0; j < j1; j++) {                                   \
        float z = tanh_gate(yz[j]);                                       \
        float f = sigmoid_gate(yf[j]) * (KEEP);                           \
        float p = cp[j], cn = p + f * (z - p);                            \
        ct[j] = cn;                                                       \
        ht[j] = sigmoid_gate(yo[j]) * cn;                                 \
    }

void qrnn_fwd(const float *y, const float *c0, const uint8_t *mask, float scale, float *c,
              float *h, int64_t T, int64_t B, int64_t H, int64_t b0, int64_t b1, int64_t j0,
              int64_t j1)
{
    for (int64_t bi = b0; bi < b1; bi++) {
        const float *prev = c0 + bi * H;
        for (int64_t t = 0; t < T; t++) {
            const int64_t row = (t * B + bi) * H;
            const float *restrict yz = y + 3 * row;
            const float *restrict yf = yz + H;
            const float *restrict yo = yz + 2 * H;
            const float *restrict cp = prev;
            float *restrict ct = c + row;
            float *restrict ht = h + row;
            if (mask) {
                const uint8_t *restrict m = mask + row;
                FWD_LANES(scale * (float)m[j])
            } else {
                FWD_LANES(scale)
            }
            prev = ct;
        }
    }
}

/* Backward of qrnn_fwd, the gates recomputed from y: gh = dL/dh [T, B, H]; gc = extra dL/dc
   [T, B, H] or 0; dy [T, B, 3H] receives dL/dy; dc0 [B, H] holds the reverse carry and ends as
   dL/dc0. f = sigmoid(y_f) * keep with keep = scale * mask: df/dy_f = keep sf (1 - sf). */
#define BWD_LANES(KEEP, GC)                                               \
    _Pragma("GCC ivdep")                                                  \
    for (int64_t j = j0; j < j1; j++) {                                   \
        float z = tanh_gate(yz[j]), sf = sigmoid_gate(yf[j]);             \
        float o = sigmoid_gate(yo[j]), keep = (KEEP), f = sf * keep;      \
        float ghj = g_h[j], g = ghj * o + carry[j] + (GC), gz = g * f;    \
        d_o[j] = ghj * ct[j] * o * (1.0f - o);                            \
        dz[j] = gz * (1.0f - z * z);                                      \
        df[j] = g * (z - cp[j]) * keep * sf * (1.0f - sf);                \
        carry[j] = g - gz;                                                \
    }

void qrnn_bwd(const float *y, const float *c0, const uint8_t *mask, const float *c,
              const float *gh, const float *gc, float scale, float *dy, float *dc0,
              int64_t T, int64_t B, int64_t H, int64_t b0, int64_t b1, int64_t j0, int64_t j1)
{
    for (int64_t bi = b0; bi < b1; bi++) {
        float *restrict carry = dc0 + bi * H;
        for (int64_t j = j0; j < j1; j++) carry[j] = 0.0f;
        for (int64_t t = T - 1; t >= 0; t--) {
            const int64_t row = (t * B + bi) * H;
            const float *restrict yz = y + 3 * row;
            const float *restrict yf = yz + H;
            const float *restrict yo = yz + 2 * H;
            const float *restrict ct = c + row;
            const float *restrict cp = t > 0 ? c + row - B * H : c0 + bi * H;
            const float *restrict g_h = gh + row;
            const float *restrict g_c = gc ? gc + row : 0;
            const uint8_t *restrict m = mask ? mask + row : 0;
            float *restrict dz = dy + 3 * row;
            float *restrict df = dz + H;
            float *restrict d_o = dz + 2 * H;
            if (m && g_c) {
                BWD_LANES(scale * (float)m[j], g_c[j])
            } else if (m) {
                BWD_LANES(scale * (float)m[j], 0.0f)
            } else if (g_c) {
                BWD_LANES(scale, g_c[j])
            } else {
                BWD_LANES(scale, 0.0f)
            }
        }
    }
}

/* DropConnect's weight drop, fused: out = x * scale where the element's Philox4x32-10 draw is
   below thr, else 0 (kernels/philox.py has the layout and the reference). The same call with
   x = dL/d(out) is the backward: the mask is recomputed from the seed, never stored. Blocks
   blk0..blk1-1 of 4 * WD_K elements of n. */
#define WD_K 64
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

#ifdef __AVX2__
#include <immintrin.h>
/* (hi, lo) words of a * m in each of 8 32-bit lanes: vpmuludq on the even and the odd lanes */
static inline void mul32x8(__m256i a, __m256i m, __m256i *hi, __m256i *lo)
{
    __m256i even = _mm256_mul_epu32(a, m);
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}
#endif

static void philox_block(uint64_t seed, int64_t blk, uint32_t r[4][WD_K])
{
    const uint64_t base = (uint64_t)blk * WD_K;
    uint32_t key0[10], key1[10];  /* the key schedule is the same for every counter */
    key0[0] = (uint32_t)seed;
    key1[0] = (uint32_t)(seed >> 32);
    for (int i = 1; i < 10; i++) {
        key0[i] = key0[i - 1] + PHILOX_W0;
        key1[i] = key1[i - 1] + PHILOX_W1;
    }
#ifdef __AVX2__
    const __m256i m0 = _mm256_set1_epi32((int)PHILOX_M0), m1 = _mm256_set1_epi32((int)PHILOX_M1);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int k = 0; k < WD_K; k += 8) {
        uint64_t first = base + (uint64_t)k;  /* 8 counters never straddle 2**32: WD_K | 2**32 */
        __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)first), lane);
        __m256i c1 = _mm256_set1_epi32((int)(uint32_t)(first >> 32));
        __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
        for (int round = 0; round < 10; round++) {
            __m256i hi0, lo0, hi1, lo1;
            mul32x8(c0, m0, &hi0, &lo0);
            mul32x8(c2, m1, &hi1, &lo1);
            c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32((int)key0[round]));
            c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32((int)key1[round]));
            c1 = lo1;
            c3 = lo0;
        }
        _mm256_storeu_si256((__m256i *)(r[0] + k), c0);
        _mm256_storeu_si256((__m256i *)(r[1] + k), c1);
        _mm256_storeu_si256((__m256i *)(r[2] + k), c2);
        _mm256_storeu_si256((__m256i *)(r[3] + k), c3);
    }
#else
    for (int k = 0; k < WD_K; k++) {  /* gcc vectorises this over k */
        uint64_t ctr = base + (uint64_t)k;
        uint32_t c0 = (uint32_t)ctr, c1 = (uint32_t)(ctr >> 32), c2 = 0, c3 = 0;
        for (int round = 0; round < 10; round++) {
            uint64_t p0 = (uint64_t)PHILOX_M0 * c0, p1 = (uint64_t)PHILOX_M1 * c2;
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ key0[round];
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ key1[round];
            c1 = (uint32_t)p1;
            c3 = (uint32_t)p0;
            c0 = n0;
            c2 = n2;
        }
        r[0][k] = c0; r[1][k] = c1; r[2][k] = c2; r[3][k] = c3;
    }
#endif
}

void wdrop(const float *x, float *out, int64_t n, uint64_t seed, uint32_t thr, float scale,
           int64_t blk0, int64_t blk1)
{
    uint32_t r[4][WD_K];
    for (int64_t blk = blk0; blk < blk1; blk++) {
        philox_block(seed, blk, r);
        for (int o = 0; o < 4; o++) {
            const int64_t s = (blk * 4 + o) * WD_K;
            const int64_t len = n - s < WD_K ? n - s : WD_K;
            const uint32_t *restrict ro = r[o];
            const float *restrict xs = x + s;
            float *restrict os = out + s;
            for (int64_t k = 0; k < len; k++) os[k] = ro[k] < thr ? xs[k] * scale : 0.0f;
        }
    }
}

/* The draws themselves (for tests against the reference): bits[i] for i in the blocks. */
void philox_fill(uint32_t *bits, int64_t n, uint64_t seed, int64_t blk0, int64_t blk1)
{
    uint32_t r[4][WD_K];
    for (int64_t blk = blk0; blk < blk1; blk++) {
        philox_block(seed, blk, r);
        for (int o = 0; o < 4; o++) {
            const int64_t s = (blk * 4 + o) * WD_K;
            for (int64_t k = 0; k < WD_K && s + k < n; k++) bits[s + k] = r[o][k];
        }
    }
}

/* The softmax loss over rows r0..r1-1 of logits x [N, V]: lse[i] = log sum_j exp(x_ij) and
   nll[i] = lse[i] - x[i, t_i] (forward, one read of each row: max, then the sum of exp in a
   second pass that finds the row in cache); g_x = (exp(x - lse) - [j = t_i]) g_i (backward,
   one read and one write). */
void softmax_nll_fwd(const float *x, const int64_t *t, float *lse, float *nll, int64_t V,
                     int64_t r0, int64_t r1)
{
    for (int64_t i = r0; i < r1; i++) {
        const float *restrict row = x + i * V;
        /* 16 partial maxima and sums, so that gcc vectorises both reductions (a single
           accumulator would pin the order of the float operations) */
        float mx[16], acc[16];
        for (int l = 0; l < 16; l++) mx[l] = row[0];
        int64_t j = 0;
        for (; j + 16 <= V; j += 16)
            for (int l = 0; l < 16; l++) mx[l] = row[j + l] > mx[l] ? row[j + l] : mx[l];
        float m = row[0];
        for (int l = 0; l < 16; l++) m = mx[l] > m ? mx[l] : m;
        for (; j < V; j++) m = row[j] > m ? row[j] : m;
        for (int l = 0; l < 16; l++) acc[l] = 0.0f;
        for (j = 0; j + 16 <= V; j += 16)
            for (int l = 0; l < 16; l++) acc[l] += exp_gate(row[j + l] - m);
        float sum = 0.0f;
        for (; j < V; j++) sum += exp_gate(row[j] - m);
        for (int l = 0; l < 16; l++) sum += acc[l];
        lse[i] = m + logf(sum);
        nll[i] = lse[i] - row[t[i]];
    }
}

void softmax_nll_bwd(const float *x, const int64_t *t, const float *lse, const float *g,
                     float *gx, int64_t V, int64_t r0, int64_t r1)
{
    for (int64_t i = r0; i < r1; i++) {
        const float *restrict row = x + i * V;
        float *restrict out = gx + i * V;
        const float l = lse[i], gi = g[i];
        for (int64_t j = 0; j < V; j++) out[j] = exp_gate(row[j] - l) * gi;
        out[t[i]] -= gi;
    }
}
"""

# -fno-trapping-math lets gcc if-convert (and so vectorise) the clamp in exp_gate; results are
# the same IEEE ones
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fPIC", "-shared", "-std=c99"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable
_pool: ThreadPoolExecutor | None = None


def _forget_pool() -> None:  # a forked child has the pool object but none of its threads
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def cache_dir() -> Path:
    return Path(os.environ.get("DIST_LM_CACHE") or Path.home() / ".cache" / "dist_lm")


def _cpu_key() -> str:
    """What -march=native depends on: the machine and its CPU feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + flags


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    key = hashlib.sha256("\0".join([SOURCE, cc, *FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    path = cache_dir() / f"qrnn_cpu-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, out = Path(tmp) / "qrnn_cpu.c", Path(tmp) / "qrnn_cpu.so"
            src.write_text(SOURCE)
            res = subprocess.run([cc, *FLAGS, str(src), "-o", str(out), "-lm"],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                warnings.warn(f"dist-lm: the fused QRNN CPU kernel did not build ({cc}: "
                              f"{res.stderr.strip()[:300]}); using the unfused torch path")
                return None
            os.replace(out, path)
    lib = ctypes.CDLL(str(path))
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.qrnn_fwd.argtypes = [ptr, ptr, ptr, f32, ptr, ptr] + [i64] * 7
    lib.qrnn_bwd.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, f32, ptr, ptr] + [i64] * 7
    lib.wdrop.argtypes = [ptr, ptr, i64, ctypes.c_uint64, ctypes.c_uint32, f32, i64, i64]
    lib.philox_fill.argtypes = [ptr, i64, ctypes.c_uint64, i64, i64]
    lib.qrnn_fwd.restype = lib.qrnn_bwd.restype = lib.wdrop.restype = None
    lib.philox_fill.restype = None
    lib.softmax_nll_fwd.argtypes = [ptr] * 4 + [i64] * 3
    lib.softmax_nll_bwd.argtypes = [ptr] * 5 + [i64] * 3
    lib.softmax_nll_fwd.restype = lib.softmax_nll_bwd.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot be built."""
    global _lib
    if _lib is False:
        with _lock:
            if _lib is False:
                try:
                    _lib = _build()
                except OSError as e:  # unwritable cache, a library that does not load
                    warnings.warn(f"dist-lm: the fused QRNN CPU kernel is unavailable ({e}); "
                                  f"using the unfused torch path")
                    _lib = None
    return _lib


def _threads(work_items: int) -> int:
    return max(1, min(torch.get_num_threads(), work_items))


def _parallel(fn, args: list, T: int, B: int, H: int) -> None:
    """fn(*args, T, B, H, b0, b1, j0, j1) over the b x H lanes on torch.get_num_threads() threads
    (the calling one and n-1 pool threads), in a few parts per thread (whole rows of b when there
    are enough, else column ranges of each row) taken in turn: a thread that the OS preempts on
    a shared machine delays its current part, not a fixed share of the work."""
    n = _threads(B * H // 1024 or 1)
    if n == 1:
        fn(*args, T, B, H, 0, B, 0, H)
        return
    k = 4 * n  # parts
    if B >= k:
        parts = [(B * i // k, B * (i + 1) // k, 0, H) for i in range(k)]
    else:
        per_row = -(-k // B)
        parts = [(bi, bi + 1, H * i // per_row, H * (i + 1) // per_row)
                 for bi in range(B) for i in range(per_row)]
    _run_parts(lambda part: fn(*args, T, B, H, *part), parts, n)


def _run_parts(call, parts: list, n: int) -> None:
    """call(part) for every part, on n threads (the calling one and n-1 pool threads), each
    taking the next part when it is free."""
    global _pool
    todo, lock = iter(parts), threading.Lock()

    def work():
        while True:
            with lock:
                part = next(todo, None)
            if part is None:
                return
            call(part)

    if _pool is None or _pool._max_workers != n - 1:  # first call, or a new thread count
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="dist-lm-qrnn")
    helpers = [_pool.submit(work) for _ in range(n - 1)]
    work()
    for fut in helpers:
        fut.result()


def _split(fn, args: list, n_items: int, numel: int) -> None:
    """fn(*args, i0, i1) over items 0..n_items-1 (rows, Philox blocks) that hold numel elements
    in all, on the pool; one thread below ~64k elements, where a second costs more than it saves."""
    n = min(_threads(numel // 65536 or 1), max(n_items, 1))
    if n == 1:
        fn(*args, 0, n_items)
        return
    k = min(4 * n, n_items)
    _run_parts(lambda part: fn(*args, *part),
               [(n_items * i // k, n_items * (i + 1) // k) for i in range(k)], n)


def _blocks(fn, args: list, numel: int) -> None:
    """fn(*args, blk0, blk1) over the Philox blocks of numel elements."""
    from .philox import K

    _split(fn, args, -(-numel // (4 * K)), numel)


def _p(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def byte_mask(mask: Tensor | None) -> Tensor | None:
    """The zoneout mask as one byte per lane: bool/uint8 as they are, 0/1 floats converted."""
    if mask is None:
        return None
    return (mask if mask.dtype in (torch.bool, torch.uint8) else mask != 0).contiguous().view(
        torch.uint8)


def forward(y: Tensor, c0: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """y: contiguous fp32 [T, b, 3H] pre-activations; c0: fp32 [b, H]; mask: byte_mask's
    [T, b, H] or None. Returns h, c: [T, b, H]."""
    lib = library()
    T, B, H3 = y.shape
    H = H3 // 3
    c0 = c0.contiguous()  # named: each pointer below must outlive the call
    c, h = y.new_empty(T, B, H), y.new_empty(T, B, H)
    _parallel(lib.qrnn_fwd, [_p(y), _p(c0), _p(mask), scale, _p(c), _p(h)], T, B, H)
    return h, c


def backward(gh: Tensor, gc: Tensor | None, y: Tensor, c0: Tensor, mask: Tensor | None,
             c: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Gradients (dL/dy [T, b, 3H], dL/dc0 [b, H]) of forward's outputs h (gh) and c (gc, or
    None when c received none); fp32 throughout."""
    lib = library()
    T, B, H3 = y.shape
    H = H3 // 3
    gh = gh.contiguous()
    gc = None if gc is None else gc.contiguous()
    c0 = c0.contiguous()
    dy, dc0 = torch.empty_like(y), torch.empty_like(c0)
    _parallel(lib.qrnn_bwd, [_p(y), _p(c0), _p(mask), _p(c), _p(gh), _p(gc), scale, _p(dy),
                             _p(dc0)], T, B, H)
    return dy, dc0


def weight_drop(x: Tensor, seed: int, thr: int, scale: float) -> Tensor:
    """x * scale where the element's Philox draw (kernels/philox.py) is below thr, else 0;
    x: fp32 (made contiguous). The backward of weight drop is the same call on the gradient."""
    lib = library()
    x = x.contiguous()
    out = torch.empty_like(x)
    _blocks(lib.wdrop, [_p(x), _p(out), x.numel(), seed, thr, scale], x.numel())
    return out


def philox_fill(n: int, seed: int) -> Tensor:
    """The n draws weight_drop compares with thr (as int64 in [0, 2**32)): for tests."""
    bits = torch.empty(n, dtype=torch.int32)
    _blocks(library().philox_fill, [_p(bits), n, seed], n)
    return bits.to(torch.int64) & 0xFFFFFFFF


def softmax_nll_forward(x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(nll, lse) per row of contiguous fp32 logits x [N, V] for contiguous int64 targets [N]
    in [0, V) (the kernel reads x[i, targets[i]]: callers check the range)."""
    N, V = x.shape
    lse, nll = x.new_empty(N), x.new_empty(N)
    _split(library().softmax_nll_fwd, [_p(x), _p(targets), _p(lse), _p(nll), V], N, N * V)
    return nll, lse


def softmax_nll_backward(x: Tensor, targets: Tensor, lse: Tensor, g: Tensor) -> Tensor:
    """dL/dx of sum_i g_i nll_i: (softmax(x) - onehot(targets)) * g[:, None]."""
    N, V = x.shape
    g = g.contiguous().float()
    gx = torch.empty_like(x)
    _split(library().softmax_nll_bwd, [_p(x), _p(targets), _p(lse), _p(g), _p(gx), V], N, N * V)
    return gx
