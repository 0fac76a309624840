"""Tiny corpora and runs for the eval tests, built with the real prepare, StreamLoader and
build_model: a text:DIR corpus prepared into shards, and a run directory (config.json,
vocab.json, checkpoints/step-00000001/{model.pt, DONE}) holding a briefly trained model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_lm.config import Config, ModelConfig
from dist_lm.data.prepare import prepare_corpus
from dist_lm.data.streams import StreamLoader
from dist_lm.data.tokenizers import load_tokenizer
from dist_lm.models import build_model, detach_hidden
from dist_lm.run.directory import write_run_files
from dist_lm.run.layout import step_dir_name

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: a second torch thread only spins against the
    other processes (10x slower under load). Restored after each module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


WORDS = ("the cat dog sat on a mat and ran to big red house when it rained over "
         "hills sun was warm light came down").split()


def sentences(n: int, seed: int) -> str:
    """Lines of a small Markov-ish language (learnable, not trivial)."""
    g = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        k = int(g.integers(3, 9))
        start = int(g.integers(0, len(WORDS)))
        steps = g.integers(0, 3, size=k)
        lines.append(" ".join(WORDS[(start + int(s)) % len(WORDS)] for s in np.cumsum(steps)))
    return "\n".join(lines) + "\n"


def make_corpus(root: Path, train: str, valid: str, test: str, tokenizer: str = "word",
                name: str = "corpus") -> Path:
    src = root / f"{name}-text"
    src.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (src / f"{split}.txt").write_text(text)
    return prepare_corpus(f"text:{src}", out=root / name, tokenizer=tokenizer, download=False,
                          workers=1, quiet=True, chunk_len=256)


def tiny_config(corpus_dir: Path, arch: str = "lstm", head: str = "softmax") -> Config:
    cfg = Config()
    cfg.data.shards = str(corpus_dir)
    cfg.model = ModelConfig(arch=arch, emb_size=16, hidden_size=24, n_layers=2, head=head,
                            cutoffs=[5, 12] if head == "adaptive" else [], n_experts=3)
    cfg.train.bptt = 12
    cfg.log.wandb_mode = "disabled"
    return cfg


def make_run(root: Path, corpus_dir: Path, arch: str = "lstm", head: str = "softmax",
             train_steps: int = 30, name: str = "run", seed: int = 0) -> Path:
    """A run directory with one finished checkpoint of a briefly trained tiny model."""
    cfg = tiny_config(corpus_dir, arch, head)
    run_dir = root / name
    write_run_files(run_dir, cfg, corpus_dir)
    torch.manual_seed(seed)
    model = build_model(cfg.model, load_tokenizer(corpus_dir).vocab_size)
    if train_steps:
        opt = torch.optim.Adam(model.parameters(), lr=3e-2)
        model.train()
        hidden, steps = model.init_hidden(4), 0
        while steps < train_steps:
            for x, y in StreamLoader(corpus_dir, "train", 4, bptt=12):
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


def split_ids(corpus_dir: Path, split: str) -> list[int]:
    tok = load_tokenizer(corpus_dir)
    text = (corpus_dir.parent / f"{corpus_dir.name}-text" / f"{split}.txt").read_text()
    return tok.encode(text)
