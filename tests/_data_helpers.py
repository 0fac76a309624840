"""Helpers for the data tests: plain reference implementations, shard reading, a loopback
HTTP server, and running the CLI as a subprocess."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


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


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "dist_lm", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)


def assert_clean_failure(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, one `dist-lm: error:` line (the last) naming the needles, no traceback."""
    err = res.stderr.strip()
    assert res.returncode != 0, (res.stdout, err)
    assert "Traceback" not in err and "Traceback" not in res.stdout, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert errors == lines[-1:] and lines[-1].startswith("dist-lm: error: "), err  # progress lines may precede
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]
