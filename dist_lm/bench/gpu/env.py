"""Part `env`: versions (torch, CUDA, cuDNN, Triton, NCCL, DeepSpeed and the kit's packages), a
C compiler that builds against Python.h (Triton builds its launcher at first launch, the CPU
QRNN kernel is built the same way), TF32 state, the GPU's name and memory."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch

# the packages the device kit brings (launch/gpu_kit.sh) and those of the image it relies on
PACKAGES = ("triton", "numpy", "deepspeed", "pydantic", "typing-extensions", "fire",
            "webdataset", "tqdm")


def version(dist: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def compiler() -> tuple[str | None, str]:
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


def versions() -> list[dict]:
    cuda = torch.cuda.is_available()
    na = "n/a"
    nccl = na
    if cuda:
        with contextlib.suppress(Exception):
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    rows = [{"name": "python", "value": platform.python_version(), "unit": ""},
            {"name": "torch", "value": torch.__version__, "unit": ""},
            {"name": "CUDA (torch build)", "value": torch.version.cuda or na, "unit": ""},
            {"name": "cuDNN", "value": str(torch.backends.cudnn.version() or na) if cuda else na,
             "unit": ""},
            {"name": "NCCL", "value": nccl, "unit": ""}]
    rows += [{"name": p, "value": version(p), "unit": ""} for p in PACKAGES]
    # every package the check imports must import (the kit installed, nothing missing)
    for mod in ("fire", "webdataset", "deepspeed", "triton"):
        try:
            __import__(mod)
            rows.append({"name": f"import {mod}", "value": "ok", "unit": "", "ok": True})
        except Exception as exc:  # noqa: BLE001 - reported, the other rows still come
            rows.append({"name": f"import {mod}", "value": type(exc).__name__, "unit": "",
                         "ok": False, "error": str(exc)[-500:]})
    return rows


def machine() -> list[dict]:
    cc, status = compiler()
    rows = [{"name": "C compiler builds against Python.h (Triton's launcher)",
             "value": cc or "none", "unit": "", "ok": status == "ok",
             **({} if status == "ok" else {"error": status})},
            {"name": "TF32 matmul (torch default in this process)",
             "value": str(torch.backends.cuda.matmul.allow_tf32), "unit": ""},
            {"name": "float32 matmul precision", "value": torch.get_float32_matmul_precision(),
             "unit": ""}]
    with contextlib.suppress(Exception):
        from ...config import Config

        rows.append({"name": "train.tf32 default (the Trainer sets TF32 on CUDA from it)",
                     "value": str(Config().train.tf32), "unit": ""})
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        rows += [{"name": "GPU", "value": prop.name, "unit": ""},
                 {"name": "GPU memory", "value": prop.total_memory / 2**30, "unit": "GiB"},
                 {"name": "GPU compute capability", "value": f"{prop.major}.{prop.minor}",
                  "unit": ""},
                 {"name": "GPU multiprocessors", "value": prop.multi_processor_count,
                  "unit": ""},
                 {"name": "GPUs visible", "value": torch.cuda.device_count(), "unit": ""}]
    else:
        rows += [{"name": "GPU", "value": "n/a", "unit": ""},
                 {"name": "GPU memory", "value": "n/a", "unit": "GiB"}]
    rows.append({"name": "CPUs", "value": os.cpu_count() or 0, "unit": ""})
    return rows


def cases(plan, ctx) -> list[tuple[str, object]]:
    return [("versions", versions), ("machine", machine)]
