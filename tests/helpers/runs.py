"""Runs for the tests: a Trainer and its metrics, a run directory holding a briefly trained
model for eval (built with the real StreamLoader and build_model), waiting on a background
process, and the one-thread fixture."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch

from dist_lm.config import Config, ModelConfig
from dist_lm.data.streams import StreamLoader
from dist_lm.data.tokenizers import load_tokenizer
from dist_lm.models import build_model, detach_hidden
from dist_lm.run.directory import write_run_files
from dist_lm.run.layout import step_dir_name

from helpers.config import TINY_BPTT, TINY_MODEL

# metrics.jsonl keys that measure time, not the run: left out where two runs are compared
TIMING = {"time", "tokens_per_s", "tokens_per_s_per_device", "data_wait_share", "interval_s",
          "elapsed_s", "valid_seconds", "train_seconds"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: a second torch thread only spins against the
    other processes (10x slower under load). Restored after each module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_trainer(cfg, **kwargs):
    from dist_lm.train.trainer import Trainer

    return Trainer(cfg, **kwargs)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def wait_for(cond, timeout: float = 120.0, what: str = "", proc=None):
    """Poll `cond` until it returns something true (returned); fail after `timeout` seconds or
    as soon as `proc` (a Popen) has ended."""
    t0 = time.monotonic()
    while True:
        got = cond()
        if got:
            return got
        if proc is not None:
            assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what or cond}"
        time.sleep(0.05)


def eval_config(corpus_dir: Path, arch: str = "lstm", head: str = "softmax") -> Config:
    """The tiny model with the library's default regularizers, as make_run trains it."""
    cfg = Config()
    cfg.data.shards = str(corpus_dir)
    cfg.model = ModelConfig(arch=arch, **TINY_MODEL, head=head,
                            cutoffs=[5, 12] if head == "adaptive" else [], n_experts=3)
    cfg.train.bptt = TINY_BPTT
    cfg.log.wandb_mode = "disabled"
    return cfg


def make_run(root: Path, corpus_dir: Path, arch: str = "lstm", head: str = "softmax",
             train_steps: int = 30, name: str = "run", seed: int = 0) -> Path:
    """A run directory with one finished checkpoint of a briefly trained tiny model."""
    cfg = eval_config(corpus_dir, arch, head)
    run_dir = root / name
    write_run_files(run_dir, cfg, corpus_dir)
    torch.manual_seed(seed)
    model = build_model(cfg.model, load_tokenizer(corpus_dir).vocab_size)
    if train_steps:
        opt = torch.optim.Adam(model.parameters(), lr=3e-2)
        model.train()
        hidden, steps = model.init_hidden(4), 0
        while steps < train_steps:
            for x, y in StreamLoader(corpus_dir, "train", 4, bptt=TINY_BPTT):
                out = model(x, hidden, y)
                hidden = detach_hidden(out.hidden)
                opt.zero_grad()
                out.nll.mean().backward()
                opt.step()
                steps += 1
                if steps >= train_steps:
                    break
    step = run_dir / "checkpoints" / step_dir_name(1)
    step.mkdir(parents=True)
    torch.save(model.state_dict(), step / "model.pt")
    (step / "DONE").write_text("")
    return run_dir


def sha256_dir(d: Path) -> dict[str, str]:
    """Digest of every file in a step directory except eval results."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.is_file() and not p.name.startswith("eval-")}
