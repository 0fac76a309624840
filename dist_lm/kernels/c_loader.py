"""Builds the CPU C kernels of kernels/csrc/ and loads them with ctypes, each on first use.

    KERNEL = CKernel("softmax_nll", {"softmax_nll_fwd": [ptr] * 4 + [i64] * 3, ...})
    lib = KERNEL.library()   # ctypes.CDLL with those signatures, or None: use the torch path

Each kernel is one C file, csrc/NAME.c (with the headers beside it), and becomes its own shared
library. The sources have no torch headers: gcc builds one in about a second into
$DIST_LM_CACHE (default ~/.cache/dist_lm) under a name hashed from the sources, the compiler, the
flags and the CPU, written to a temporary name and renamed into place, so concurrent processes
never load a half-written file. -march=native picks each machine's vector instructions (a
source's `#ifdef __AVX2__` paths included; the plain paths serve other CPUs). Without a C
compiler, or on a failed build, `library()` returns None and each caller uses its torch path;
nothing else changes. ctypes rather than torch.utils.cpp_extension: these are plain C functions
on raw pointers, and a build without torch headers takes a second instead of a minute.
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
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
# -fno-trapping-math lets gcc if-convert (and so vectorise) the clamp in exp_gate; results are
# the same IEEE ones
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fPIC", "-shared", "-std=c99"]


def cache_dir() -> Path:
    return Path(os.environ.get("DIST_LM_CACHE") or Path.home() / ".cache" / "dist_lm")


def compiler() -> str | None:
    """$CC, else cc or gcc on PATH; None where there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_key() -> str:
    """What -march=native depends on: the machine and its CPU feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + flags


class CKernel:
    """One C kernel: csrc/NAME.c, and the argument types of the functions it exports (argtypes
    lists of ctypes types; every function returns void)."""

    def __init__(self, name: str, signatures: dict[str, list]):
        self.name = name
        self.source = CSRC / f"{name}.c"
        self.signatures = signatures
        self._lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable
        self._lock = threading.Lock()

    def library(self) -> ctypes.CDLL | None:
        """The compiled kernel, built on first use; None where it cannot be built."""
        if self._lib is False:
            with self._lock:
                if self._lib is False:
                    try:
                        self._lib = self.build()
                    except OSError as e:  # unwritable cache, a library that does not load
                        warnings.warn(f"dist-lm: the C kernel csrc/{self.name}.c is unavailable "
                                      f"({e}); using the torch path")
                        self._lib = None
        return self._lib

    def build(self) -> ctypes.CDLL | None:
        """Compile into the cache (unless already there) and load; None without a compiler or
        on a failed build (with a warning); OSError where the cache or the library fails."""
        cc = compiler()
        if cc is None:
            return None
        # the headers beside the sources count too: any of them may be included
        texts = [p.read_text() for p in [self.source, *sorted(CSRC.glob("*.h"))]]
        key = hashlib.sha256("\0".join([*texts, cc, *FLAGS, _cpu_key()]).encode()).hexdigest()
        path = cache_dir() / f"{self.name}-{key[:16]}.so"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                out = Path(tmp) / f"{self.name}.so"
                res = subprocess.run([cc, *FLAGS, str(self.source), "-o", str(out), "-lm"],
                                     capture_output=True, text=True)
                if res.returncode != 0:
                    warnings.warn(f"dist-lm: the C kernel csrc/{self.name}.c did not build "
                                  f"({cc}: {res.stderr.strip()[:300]}); using the torch path")
                    return None
                os.replace(out, path)
        lib = ctypes.CDLL(str(path))
        for fn, argtypes in self.signatures.items():
            getattr(lib, fn).argtypes = argtypes
            getattr(lib, fn).restype = None
        return lib
