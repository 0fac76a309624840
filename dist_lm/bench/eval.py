"""`dist-lm bench eval`: the neural cache pointer, vectorised against the per-token reference.

The small PTB model (emb 200, hidden 400, 3 LSTM layers, tied softmax; untrained: only the
speed of the cache over hidden-state keys matters here) reads PTB test as one stream (batch 1,
bptt 70). Figures:

- cache only: `NeuralCache` over all test positions vs `pointer_reference` (pointer.py's
  per-token loop with a one-hot history over the vocabulary) on the first tokens;
- end to end: model + cache, where the reference also needs the full softmax per position;
- the largest difference between the two log-probabilities (they compute the same thing).

PTB is read from $DIST_LM_SHARED_DATA, else ../shared/data, else $DIST_LM_DATA_DIR (ptb/).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import benchmark_corpora

WINDOW = 500
THETA, LAMBDAH = 1.0, 0.1
BPTT = 70


def _ptb_dir() -> Path:
    return benchmark_corpora() / "ptb"


def _ptb_test_ids() -> tuple[torch.Tensor, int]:
    """PTB test as ids in AWD-LSTM's vocabulary order (first appearance in train)."""
    from ..data.tokenizers import EOS, WordTokenizer

    d = _ptb_dir()
    itos, seen = [], set()
    for name in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
        for line in (d / name).read_text().splitlines():
            for w in line.split() + [EOS]:
                if w not in seen:
                    seen.add(w)
                    itos.append(w)
    tok = WordTokenizer(itos, unk="<unk>")
    return torch.tensor(tok.encode((d / "ptb.test.txt").read_text()), dtype=torch.long), len(itos)


def _small_model(vocab: int):
    from ..config import ModelConfig
    from ..models import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(emb_size=200, hidden_size=400, n_layers=3)
    return build_model(cfg, vocab).eval()


@torch.no_grad()
def _forward(model, ids: torch.Tensor, full: bool):
    """Keys [N, d], log p(target) [N] and, if `full`, log-distributions [N, V]."""
    from ..models import detach_hidden

    hidden = model.init_hidden(1)
    keys, lv, full_lp = [], [], []
    for s in range(0, len(ids) - 1, BPTT):
        x = ids[s:s + BPTT].unsqueeze(1)
        y = ids[s + 1:s + 1 + BPTT].unsqueeze(1)
        x = x[:len(y)]
        out = model(x, hidden, y)
        hidden = detach_hidden(out.hidden)
        keys.append(out.output[:, 0])
        lv.append(-out.nll[:, 0])
        if full:
            full_lp.append(model.log_prob(out.output)[:, 0])
    return torch.cat(keys), torch.cat(lv), (torch.cat(full_lp) if full else None)


def run(quick: bool = False) -> list[dict]:
    from ..eval.cache import NeuralCache, mix_log_prob, pointer_reference

    ids, V = _ptb_test_ids()
    if quick:
        ids = ids[:3000]
    n_ref = 300 if quick else 3000
    model = _small_model(V)
    N = len(ids) - 1
    targets = ids[1:]

    t0 = time.perf_counter()
    keys, lv, _ = _forward(model, ids, full=False)
    t_model = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = NeuralCache(WINDOW, THETA)
    logp = []
    for s in range(0, N, BPTT):  # the same blocks as evaluation uses
        p, seen = cache.step(keys[s:s + BPTT].unsqueeze(1), targets[s:s + BPTT].unsqueeze(1))
        logp.append(mix_log_prob(lv[s:s + BPTT].unsqueeze(1), p, LAMBDAH, seen)[:, 0])
    logp = torch.cat(logp)
    t_cache = time.perf_counter() - t0

    ref_ids = ids[:n_ref + 1]
    t0 = time.perf_counter()
    rkeys, _, rfull = _forward(model, ref_ids, full=True)
    t_ref_model = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = pointer_reference(rfull, rkeys, ref_ids[1:], WINDOW, THETA, LAMBDAH)
    t_ref = time.perf_counter() - t0
    diff = float((ref - logp[:n_ref]).abs().max())

    vec_cache = N / t_cache
    ref_cache = n_ref / t_ref
    vec_e2e = N / (t_model + t_cache)
    ref_e2e = n_ref / (t_ref_model + t_ref)
    tag = f"PTB test, window {WINDOW}, small model"
    return [
        {"name": f"cache only, vectorised ({N} tok)", "value": vec_cache, "unit": "tok/s",
         "baseline": ref_cache, "ratio": vec_cache / ref_cache},
        {"name": f"cache only, per-token reference ({n_ref} tok)", "value": ref_cache,
         "unit": "tok/s"},
        {"name": f"model + cache, vectorised ({tag})", "value": vec_e2e, "unit": "tok/s",
         "baseline": ref_e2e, "ratio": vec_e2e / ref_e2e},
        {"name": "model alone (no cache), batch 1", "value": N / t_model, "unit": "tok/s"},
        {"name": f"max |log p vectorised - reference| ({n_ref} tok)", "value": diff,
         "unit": "nats"},
    ]
