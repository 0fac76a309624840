"""Rough edges at the boundary with the user: a device this machine lacks, a checkpoint that
would run code when unpickled, the launch scripts' printed commands, the package metadata."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.cli import REPO, assert_clean_failure, run_cli
from helpers.corpus import make_corpus, sentences
from helpers.runs import make_run
from helpers.runs import one_thread  # noqa: F401 (autouse fixture)
from dist_lm.distributed import pick_device
from dist_lm.errors import UserError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("edges")
    return make_corpus(root, sentences(60, 1), sentences(10, 2), sentences(10, 3))


@pytest.fixture(scope="module")
def run_dir(corpus):
    return make_run(corpus.parent, corpus, train_steps=0)


def _step(run: Path) -> Path:
    return run / "checkpoints" / "step-00000001"


# --- devices --------------------------------------------------------------------------------

@pytest.mark.skipif(not NO_CUDA, reason="needs a torch without a usable GPU")
def test_train_on_cuda_without_cuda_is_one_line(corpus, tmp_path):
    out = tmp_path / "run"
    res = run_cli("train", str(REPO / "configs" / "cpu_smoke.toml"), "--train.device=cuda",
                  f"--data.shards={corpus}", f"--train.run_dir={out}", "--train.max_steps=1",
                  cwd=tmp_path)
    line = assert_clean_failure(res, "'cuda'", "--train.device=cpu")
    assert "CUDA build" in line or "NVIDIA driver" in line
    assert res.returncode == 2 and not out.exists()  # refused before anything was written


@pytest.mark.skipif(not NO_CUDA, reason="needs a torch without a usable GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_eval_on_cuda_without_cuda_is_one_line(run_dir, device):
    res = run_cli("eval", str(run_dir), "--split", "valid", "--device", device)
    assert_clean_failure(res, f"'{device}'", "--device cpu")
    assert not list(_step(run_dir).glob("eval-*.json"))


def test_unknown_device_name_is_one_line(run_dir):
    res = run_cli("eval", str(run_dir), "--split", "valid", "--device", "gpu")
    assert_clean_failure(res, "unknown device 'gpu'", "cuda:N")
    assert pick_device("cpu") == torch.device("cpu") and pick_device("CPU").type == "cpu"
    if NO_CUDA:
        assert pick_device("auto") == torch.device("cpu")


def test_cuda_index_beyond_the_device_count_is_refused(monkeypatch):
    """The GPU branch on a machine without one: torch.cuda answers as a 2-GPU machine would."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(UserError, match=r"'cuda:2' does not exist: this machine has 2 CUDA "
                                        r"device\(s\) \(cuda:0\.\.cuda:1\)"):
        pick_device("cuda:2")


@pytest.mark.skipif(NO_CUDA, reason="needs a GPU")
def test_eval_on_a_missing_gpu_index_is_one_line(run_dir):
    n = torch.cuda.device_count()
    res = run_cli("eval", str(run_dir), "--split", "valid", "--device", f"cuda:{n}")
    assert_clean_failure(res, f"'cuda:{n}' does not exist", f"cuda:{n - 1}")


# --- a checkpoint that would run code -------------------------------------------------------

class _Payload:
    """Unpickling this object runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


@pytest.fixture
def planted(run_dir, tmp_path):
    """A copy of the run whose model.pt holds the state dict plus a code-running object."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    marker = tmp_path / "PAYLOAD_RAN"
    state = torch.load(_step(run) / "model.pt", weights_only=True)
    torch.save({**state, "extra": _Payload(marker)}, _step(run) / "model.pt")
    return run, marker


def test_unsafe_checkpoint_is_refused_in_dist_lm_words(planted, tmp_path):
    run, marker = planted
    text = tmp_path / "in.txt"
    text.write_text("the cat sat\n")
    for args in (("eval", str(run), "--split", "valid"), ("score", str(run), str(text)),
                 ("generate", str(run), "--length", "3")):
        res = run_cli(*args)
        line = assert_clean_failure(res, "refused to load checkpoint file", "model.pt",
                                    "could run code", "use another checkpoint")
        assert "weights_only" not in res.stderr and "will likely succeed" not in res.stderr
        assert not marker.exists(), "the planted code ran"
        assert "damaged" not in line


def test_damaged_checkpoint_has_its_own_message(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    pt = _step(run) / "model.pt"
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])  # truncated
    res = run_cli("eval", str(run), "--split", "valid")
    line = assert_clean_failure(res, "cannot read checkpoint file", "damaged", "use another step")
    assert "refused" not in line and "weights_only" not in res.stderr


# --- launch scripts -------------------------------------------------------------------------

def test_launch_run_prints_a_command_that_reparses_to_the_same_argv(tmp_path):
    argv = ["printf", "[%s]\\n", "the company said", "it's $HOME", "--train.run_dir=a b/c", "*"]
    script = "source launch/_common.sh; run " + " ".join(shlex.quote(a) for a in argv)
    res = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    printed, *ran = res.stdout.splitlines()
    assert printed.startswith("+ ")
    assert shlex.split(printed[2:]) == argv
    assert ran == ["[the company said]", "[it's $HOME]", "[--train.run_dir=a b/c]", "[*]"]
    # and the quickstart uses that helper rather than an echo of its own
    quick = (REPO / "launch" / "quickstart.sh").read_text()
    assert "source launch/_common.sh" in quick and 'echo "+ $*"' not in quick


# --- package metadata -----------------------------------------------------------------------

def test_license_is_an_spdx_string_and_builds_without_a_warning(tmp_path):
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "BSD-3-Clause"
    assert "setuptools>=77" in meta["build-system"]["requires"]
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "dist_lm", tmp_path / "dist_lm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("from setuptools import build_meta as b; "
            "print(b.prepare_metadata_for_build_wheel('meta'))")
    (tmp_path / "meta").mkdir()
    res = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "license" not in res.stderr.lower(), res.stderr
    info = tmp_path / "meta" / res.stdout.strip().splitlines()[-1] / "METADATA"
    assert "License-Expression: BSD-3-Clause" in info.read_text()
