"""The fused QRNN recurrence on CPU: a small C kernel, compiled once per machine, called by ctypes.

The gate activations (tanh, sigmoid) are torch's own vectorised ops, one pass over the matmul's
[T, b, 3H] output; everything after them runs here in one pass over T per lane, forward
(zoneout mask, recurrence, output gate) and backward (the reverse recurrence and all three gate
gradients written straight into the [T, b, 3H] input gradient). Unfused, the same work is about
twenty torch ops on [T, b, H] tensors plus 70 single-threaded ops per step of the recurrence, each
streaming through memory; here a lane's row of H floats stays in L1 from one step to the next.

The C source has no torch headers: gcc builds it in about a second into
$DIST_LM_CACHE (default ~/.cache/dist_lm) under a name hashed from the source, the flags and
the CPU, written to a temporary name and renamed into place. Without a C compiler (or on a
failed build) `library()` returns None and the caller uses the unfused torch path; nothing
else changes. Lanes are split over torch.get_num_threads() Python threads (ctypes releases the
GIL during a call).
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

/* a: [T, B, 3H] activations (tanh z | sigmoid f | sigmoid o) of rows b0..b1-1, columns j0..j1-1.
   Forward: f <- f * scale * mask (written back: the backward reads the gate it used), then
   c_t = c_{t-1} + f (z - c_{t-1}), h_t = o c_t. mask: [T, B, H] bytes (0/1) or 0. */
void qrnn_fwd(float *a, const float *c0, const uint8_t *mask, float scale, float *c, float *h,
              int64_t T, int64_t B, int64_t H, int64_t b0, int64_t b1, int64_t j0, int64_t j1)
{
    for (int64_t bi = b0; bi < b1; bi++) {
        const float *prev = c0 + bi * H;
        for (int64_t t = 0; t < T; t++) {
            float *restrict z = a + (t * B + bi) * 3 * H;
            float *restrict f = z + H;
            const float *restrict o = z + 2 * H;
            float *restrict ct = c + (t * B + bi) * H;
            float *restrict ht = h + (t * B + bi) * H;
            const float *restrict cp = prev;
            if (mask) {
                const uint8_t *restrict m = mask + (t * B + bi) * H;
                for (int64_t j = j0; j < j1; j++) f[j] = f[j] * scale * (float)m[j];
            } else if (scale != 1.0f) {
                for (int64_t j = j0; j < j1; j++) f[j] = f[j] * scale;
            }
            for (int64_t j = j0; j < j1; j++) {
                float p = cp[j], cn = p + f[j] * (z[j] - p);
                ct[j] = cn;
                ht[j] = o[j] * cn;
            }
            prev = ct;
        }
    }
}

/* Backward of qrnn_fwd: gh = dL/dh [T, B, H]; gc = extra dL/dc [T, B, H] or 0; dy [T, B, 3H]
   receives dL/d(pre-activations) of z, f, o; dc0 [B, H] is the reverse carry and ends as dL/dc0.
   With f = scale * m * sigmoid(pre) and m in {0, 1}: df/dpre = f (1 - f / scale). */
void qrnn_bwd(const float *a, const float *c0, const float *c, const float *gh, const float *gc,
              float scale, float *dy, float *dc0,
              int64_t T, int64_t B, int64_t H, int64_t b0, int64_t b1, int64_t j0, int64_t j1)
{
    const float inv_s = scale != 0.0f ? 1.0f / scale : 0.0f;
    for (int64_t bi = b0; bi < b1; bi++) {
        float *restrict carry = dc0 + bi * H;
        for (int64_t j = j0; j < j1; j++) carry[j] = 0.0f;
        for (int64_t t = T - 1; t >= 0; t--) {
            const float *restrict z = a + (t * B + bi) * 3 * H;
            const float *restrict f = z + H;
            const float *restrict o = z + 2 * H;
            const float *restrict ct = c + (t * B + bi) * H;
            const float *restrict cp = t > 0 ? c + ((t - 1) * B + bi) * H : c0 + bi * H;
            const float *restrict g_h = gh + (t * B + bi) * H;
            const float *restrict g_c = gc ? gc + (t * B + bi) * H : 0;
            float *restrict dz = dy + (t * B + bi) * 3 * H;
            float *restrict df = dz + H;
            float *restrict d_o = dz + 2 * H;
            for (int64_t j = j0; j < j1; j++) {
                float oj = o[j], fj = f[j], zj = z[j], ghj = g_h[j];
                float g = ghj * oj + carry[j] + (g_c ? g_c[j] : 0.0f);
                float gz = g * fj;
                d_o[j] = ghj * ct[j] * oj * (1.0f - oj);
                dz[j] = gz * (1.0f - zj * zj);
                df[j] = g * (zj - cp[j]) * fj * (1.0f - fj * inv_s);
                carry[j] = g - gz;
            }
        }
    }
}
"""

FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c99"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable
_pool: ThreadPoolExecutor | None = None


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
            res = subprocess.run([cc, *FLAGS, str(src), "-o", str(out)], capture_output=True,
                                 text=True)
            if res.returncode != 0:
                warnings.warn(f"dist-lm: the fused QRNN CPU kernel did not build ({cc}: "
                              f"{res.stderr.strip()[:300]}); using the unfused torch path")
                return None
            os.replace(out, path)
    lib = ctypes.CDLL(str(path))
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.qrnn_fwd.argtypes = [ptr, ptr, ptr, f32, ptr, ptr] + [i64] * 7
    lib.qrnn_bwd.argtypes = [ptr, ptr, ptr, ptr, ptr, f32, ptr, ptr] + [i64] * 7
    lib.qrnn_fwd.restype = lib.qrnn_bwd.restype = None
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


def _parallel(fn, args: list, T: int, B: int, H: int) -> None:
    """fn(*args, T, B, H, b0, b1, j0, j1) over torch.get_num_threads() parts of the b x H lanes:
    whole rows of b when there are enough, else column ranges of each row."""
    global _pool
    n = max(1, min(torch.get_num_threads(), B * H // 1024 or 1))
    if n == 1:
        fn(*args, T, B, H, 0, B, 0, H)
        return
    if B >= n:
        parts = [(B * i // n, B * (i + 1) // n, 0, H) for i in range(n)]
    else:
        parts = [(bi, bi + 1, H * i // n, H * (i + 1) // n) for bi in range(B) for i in range(n)]
    if _pool is None or _pool._max_workers < n:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="dist-lm-qrnn")
    for fut in [_pool.submit(fn, *args, T, B, H, *p) for p in parts]:
        fut.result()


def _p(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def forward(act: Tensor, c0: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """act: contiguous fp32 [T, b, 3H] activations (its f third is overwritten with the gate
    used); c0: [b, H]; mask: bool/uint8 [T, b, H] or None. Returns h, c: [T, b, H]."""
    lib = library()
    T, B, H3 = act.shape
    H = H3 // 3
    c0 = c0.contiguous()
    if mask is not None:  # one byte per lane: bool as it is, 0/1 floats converted
        mask = (mask if mask.dtype in (torch.bool, torch.uint8) else mask != 0).contiguous()
        mask = mask.view(torch.uint8)
    c, h = act.new_empty(T, B, H), act.new_empty(T, B, H)
    _parallel(lib.qrnn_fwd, [_p(act), _p(c0), _p(mask), scale, _p(c), _p(h)], T, B, H)
    return h, c


def backward(gh: Tensor, gc: Tensor | None, act: Tensor, c0: Tensor, c: Tensor,
             scale: float) -> tuple[Tensor, Tensor]:
    """Gradients (dL/dy [T, b, 3H], dL/dc0 [b, H]) of forward's outputs h (gh) and c (gc, or
    None when c received none)."""
    lib = library()
    T, B, H3 = act.shape
    H = H3 // 3
    gh = gh.contiguous()
    gc = None if gc is None else gc.contiguous()
    c0 = c0.contiguous()  # named: the pointer below must outlive the call
    dy, dc0 = torch.empty_like(act), torch.empty_like(c0)
    _parallel(lib.qrnn_bwd, [_p(act), _p(c0), _p(c), _p(gh), _p(gc), scale, _p(dy), _p(dc0)],
              T, B, H)
    return dy, dc0
