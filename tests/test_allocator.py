"""dist_lm.allocator.keep_freed_memory: freed big host tensors stay in the process for reuse
(glibc would munmap them), the `dist-lm` entry point sets it, and DIST_LM_MALLOC=system opts
out. Each case runs in its own interpreter, which starts with glibc's defaults."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")

SCRIPT = textwrap.dedent("""
    import os, sys
    import torch

    how = sys.argv[1]
    if how == "call":
        from dist_lm.allocator import keep_freed_memory
        print("set", keep_freed_memory())
    elif how == "main":
        from dist_lm.__main__ import main
        try:
            main(["bench", "--help"])
        except SystemExit:
            pass

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    for _ in range(3):  # 64 MB: above glibc's largest mmap threshold (32 MB)
        x = torch.ones(16 * 2**20)
        before = rss()
        del x
        print("released", (before - rss()) // 2**20)
""")


def released_mb(how: str, **env) -> list[int]:
    res = subprocess.run([sys.executable, "-c", SCRIPT, how], capture_output=True, text=True,
                         timeout=120, env={**os.environ, **env})
    assert res.returncode == 0, res.stderr
    return [int(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("released")]


def test_glibc_default_gives_a_freed_64mb_tensor_back_to_the_os():
    """The behaviour keep_freed_memory changes (if this fails, the test below proves nothing)."""
    assert all(mb >= 60 for mb in released_mb("none"))


def test_keep_freed_memory_keeps_it_for_reuse():
    assert released_mb("call") == [0, 0, 0]


def test_the_dist_lm_entry_point_keeps_freed_memory():
    assert released_mb("main") == [0, 0, 0]


def test_dist_lm_malloc_system_leaves_glibc_alone():
    res = subprocess.run([sys.executable, "-c", SCRIPT, "call"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "DIST_LM_MALLOC": "system"})
    assert "set False" in res.stdout
    assert all(mb >= 60 for mb in released_mb("main", DIST_LM_MALLOC="system"))
