"""Corpora for the tests, built with the real prepare: a slice of PTB, a small generated
language; reading and damaging shards; AWD-LSTM's reference ids and windows; a loopback HTTP
server to download from."""

from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import tarfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

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
                name: str = "corpus", **prepare) -> Path:
    """The three texts as a text:DIR corpus (ROOT/NAME-text) prepared into ROOT/NAME (chunks
    of 256 tokens unless `prepare` says otherwise)."""
    from dist_lm.data.prepare import prepare_corpus

    src = root / f"{name}-text"
    src.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (src / f"{split}.txt").write_text(text)
    return prepare_corpus(f"text:{src}", out=root / name, tokenizer=tokenizer, download=False,
                          workers=1, quiet=True, **{"chunk_len": 256, **prepare})


def ptb_lines(shared_data: Path, split: str, n: int) -> str:
    """The first n lines of PTB's split."""
    return "".join((shared_data / "ptb" / f"ptb.{split}.txt").read_text().splitlines(True)[:n])


def small_corpus(root: Path, shared_data: Path, name: str = "ptb-slice", train_lines: int = 80,
                 eval_lines: int = 40, max_vocab: int = 200) -> Path:
    """The first lines of PTB's train/valid/test as a text:DIR corpus, prepared into shards of
    512 tokens (several shards per split, so reads cross shard boundaries)."""
    return make_corpus(root, *(ptb_lines(shared_data, s, n) for s, n in (
        ("train", train_lines), ("valid", eval_lines), ("test", eval_lines))), name=name,
        shard_tokens=512, max_vocab=max_vocab)


def split_ids(corpus_dir: Path, split: str) -> list[int]:
    """A split's ids, encoded from the text make_corpus kept beside the corpus."""
    from dist_lm.data.tokenizers import load_tokenizer

    tok = load_tokenizer(corpus_dir)
    text = (corpus_dir.parent / f"{corpus_dir.name}-text" / f"{split}.txt").read_text()
    return tok.encode(text)


def reference_ids(paths: list[Path]) -> tuple[dict, list[list[int]]]:
    """AWD-LSTM's data.py Dictionary/Corpus: words of each line + <eos>, ids by first appearance
    (over the files in order)."""
    w2i: dict[str, int] = {}
    out = []
    for p in paths:
        ids = []
        with open(p, encoding="utf-8") as f:
            for line in f:
                for w in line.split() + ["<eos>"]:
                    ids.append(w2i.setdefault(w, len(w2i)))
        out.append(ids)
    return w2i, out


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    nbatch = data.size(0) // bsz
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous()


def reference_windows(source: torch.Tensor, bptt: int, variable: bool, seed: int = 0,
                      max_seq_len: int = 0, epochs: int = 1):
    """AWD-LSTM main.py's train loop (variable) / evaluate loop (fixed) with get_batch."""
    rng = np.random.default_rng(seed)
    L = source.size(0)
    for _ in range(epochs):
        i = 0
        while (i < L - 1 - 1) if variable else (i < L - 1):
            if variable:
                b = bptt if rng.random() < 0.95 else bptt / 2.0
                seq_len = max(5, int(rng.normal(b, 5)))
                if max_seq_len > 0:
                    seq_len = min(seq_len, max_seq_len)
            else:
                seq_len = bptt
            seq_len = min(seq_len, L - 1 - i)
            yield source[i:i + seq_len], source[i + 1:i + 1 + seq_len]
            i += seq_len


def corrupt_copy(src: Path, dst: Path, shard: str, offset: int, mask: int = 0x01) -> Path:
    """Copy a prepared corpus and flip bits of one byte of one shard; returns dst."""
    shutil.copytree(src, dst)
    p = dst / shard
    data = bytearray(p.read_bytes())
    data[offset] ^= mask
    p.write_bytes(bytes(data))
    return dst


def read_split(corpus_dir: Path, split: str) -> np.ndarray:
    """A split's token stream, read with the standard tarfile module (independent of dist_lm)."""
    m = json.loads((corpus_dir / "manifest.json").read_text())
    parts = []
    for entry in m["splits"][split]["shards"]:
        with tarfile.open(corpus_dir / entry["name"]) as tf:
            for name in tf.getnames():
                if name.endswith(".tokens.npy"):
                    parts.append(np.load(io.BytesIO(tf.extractfile(name).read())))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@contextmanager
def http_server(root: Path, log: list | None = None, forbid: tuple = (), cut: tuple = ()):
    """Serve `root` on 127.0.0.1 (port chosen by the OS) in a thread; yields the base URL.

    Like wikitext.smerity.com it answers 403 to Python's default "Python-urllib/..." agent;
    also to every path starting with one of `forbid`. Files whose path starts with one of
    `cut` announce their full length but the connection closes after half of it. Each
    request is appended to `log` as (path, status, User-Agent)."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_response(self, code, message=None):
            if log is not None:
                log.append((self.path, code, self.headers.get("User-Agent")))
            super().send_response(code, message)

        def do_GET(self):
            agent = self.headers.get("User-Agent") or ""
            if agent.startswith("Python-urllib") or self.path.startswith(tuple(forbid)):
                self.send_error(403, "Forbidden")
                return
            if self.path.startswith(tuple(cut)):
                data = (root / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2])
                self.close_connection = True
                return
            super().do_GET()

    handler = functools.partial(Handler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
