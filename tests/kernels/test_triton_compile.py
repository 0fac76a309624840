"""Every Triton kernel variant the wrappers launch compiles for sm_90 (an H100) without a GPU,
with this machine's Triton and with the device image's Triton 3.6.0; and T (the window length)
never selects a new variant.

tests/kernels/_triton_compile.py runs the wrappers over the argument combinations the ops pass them
(dtypes, fp32 or same-dtype carries, zoneout masks, dL/dc_last or none, T = 1, 16, 17, 140,
every declared alignment, b*H and H not multiples of 16, a misaligned carry) and sends each launch
through Triton's own JIT entry with warmup=True, against a stand-in driver that answers for an
sm_90 device: the variants compiled are the ones the JIT would build on the GPU, from the real
launch arguments. Triton 3.6.0 is installed from PyPI into this session's tmp dir (about 190 MB
downloaded, 640 MB unpacked, removed after the session) and imported through PYTHONPATH; no
network fails the test rather than skipping it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from collections import defaultdict
import pytest

from helpers.cli import REPO

DEVICE_TRITON = "3.6.0"  # the GPU machine's image (torch 2.11.0+cu130)


@pytest.fixture(scope="session")
def device_triton(tmp_path_factory):
    """A directory holding Triton 3.6.0 alone, for PYTHONPATH."""
    target = tmp_path_factory.mktemp("device-triton") / "site"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir",
         "--disable-pip-version-check", "--quiet", "--target", str(target),
         f"triton=={DEVICE_TRITON}"],
        capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (
        f"could not install triton=={DEVICE_TRITON} (the GPU image's) from PyPI into {target}; "
        f"this test needs PyPI to check the kernels against it:\n{res.stdout}{res.stderr}")
    yield target
    shutil.rmtree(target, ignore_errors=True)


def compile_report(tmp_path, pythonpath: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join(pythonpath + [str(REPO)]),
               TRITON_CACHE_DIR=str(tmp_path / "triton-cache"),
               TRITON_DEFAULT_FP_FUSION="1")  # Triton's default (3.9 warns while it is unset)
    out = tmp_path / "report.json"
    script = Path(__file__).with_name("_triton_compile.py")
    res = subprocess.run([sys.executable, str(script), str(out)],
                         env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(out.read_text())


def check(report: dict) -> None:
    kernels = report["kernels"]
    # every JIT function of the kernel modules is launched, or called by a launched kernel
    for module, sources in report["modules"].items():
        launched = [name for name in sources if name in kernels]
        assert launched, f"no kernel of {module} was launched"
        for name in set(sources) - set(launched):
            assert any(re.search(rf"\b{name}\(", sources[k]) for k in launched), (
                f"{module}.{name} is neither launched by the compile check nor called by a "
                f"launched kernel: add its wrapper's launches to tests/kernels/_triton_compile.py")
    failed = [f"{name} [{ln['case']}, T={ln['T']}]: {ln['error']}"
              for name, entry in kernels.items() for ln in entry["launches"] if "error" in ln]
    assert not failed, f"{len(failed)} launches did not compile:\n" + "\n".join(failed[:3])
    for name, entry in kernels.items():
        by_case = defaultdict(dict)
        for ln in entry["launches"]:
            by_case[ln["case"]][ln["T"]] = ln["variant"]
        for case, variants in by_case.items():
            assert sorted(variants) == [1, 16, 17, 140], (name, case, variants)
            assert len(set(variants.values())) == 1, (
                f"{name} [{case}]: T selects a compiled variant: {variants}")
        first_pointer = {next(t for t in v["signature"].values() if t.startswith("*"))
                         for v in entry["variants"].values()}
        assert first_pointer == {"*fp32", "*bf16", "*fp16"}, (name, first_pointer)


@pytest.mark.slow
def test_kernels_compile_for_sm90_with_this_triton(tmp_path):
    import triton

    report = compile_report(tmp_path, [])
    assert report["triton"] == triton.__version__
    check(report)


@pytest.mark.slow
def test_kernels_compile_for_sm90_with_the_device_triton(tmp_path, device_triton):
    report = compile_report(tmp_path, [str(device_triton)])
    assert report["triton"] == DEVICE_TRITON  # PYTHONPATH took the installed one
    check(report)
