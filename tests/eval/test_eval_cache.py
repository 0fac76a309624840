"""Neural cache: vectorised == per-token loop, lambda 0 == plain, full distribution with the
adaptive head, grid search, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.corpus import make_corpus, sentences
from helpers.runs import make_run, sha256_dir
from helpers.runs import one_thread  # noqa: F401 (autouse fixture)
from dist_lm.__main__ import main
from dist_lm.eval.cache import (NeuralCache, full_cache_distribution, mix_log_prob,
                                pointer_reference)
from dist_lm.eval.evaluate import (CacheOptions, cache_search, evaluate_cache, evaluate_stream,
                                   make_loader)
from dist_lm.run.inference import load_run


def run_cache(logp, keys, targets, window, theta, lam, block, normalize=False):
    """The streaming cache over [N, b] inputs in blocks of `block` positions."""
    cache = NeuralCache(window, theta, normalize)
    out = []
    for s in range(0, targets.shape[0], block):
        t = targets[s:s + block]
        p, seen = cache.step(keys[s:s + block], t)
        lv = logp[s:s + block].gather(2, t.unsqueeze(2))[..., 0]
        out.append(mix_log_prob(lv, p, lam, seen))
    return torch.cat(out)


@pytest.mark.parametrize("window,block,normalize", [(1, 7, False), (9, 4, False), (40, 13, True),
                                                    (500, 25, False)])
def test_vectorised_equals_per_token_loop(window, block, normalize):
    g = torch.Generator().manual_seed(window)
    N, b, V, d = 160, 3, 12, 6   # a small vocabulary: many window entries match the target
    logp = torch.log_softmax(torch.randn(N, b, V, generator=g) * 2, -1)
    keys = torch.randn(N, b, d, generator=g)
    targets = torch.randint(0, V, (N, b), generator=g)
    got = run_cache(logp, keys, targets, window, 0.7, 0.3, block, normalize)
    for j in range(b):
        ref = pointer_reference(logp[:, j], keys[:, j], targets[:, j], window, 0.7, 0.3, normalize)
        torch.testing.assert_close(got[:, j], ref, rtol=1e-6, atol=1e-6)
    # and the cache changes the answer (it is not a no-op on these inputs)
    plain = logp.gather(2, targets.unsqueeze(2))[..., 0].double()
    assert (got - plain).abs().max() > 1e-2


def test_lambda_zero_equals_plain(tmp_path):
    corpus = make_corpus(tmp_path, sentences(200, 1), sentences(60, 2), sentences(40, 3))
    run = load_run(make_run(tmp_path, corpus, train_steps=10))
    loader = lambda: make_loader(corpus, "valid", 10, 12)
    plain = evaluate_stream(run.model, loader())
    zero = evaluate_cache(run.model, loader(), CacheOptions(window=50, theta=0.5, lambdah=0.0))
    assert zero[1] == plain[1]
    assert zero[0] == pytest.approx(plain[0], rel=1e-9)
    on = evaluate_cache(run.model, loader(), CacheOptions(window=50, theta=0.5, lambdah=0.2))
    assert on[0] != pytest.approx(plain[0], rel=1e-4)


@torch.no_grad()
def test_full_distribution_with_adaptive_head(tmp_path):
    corpus = make_corpus(tmp_path, sentences(200, 1), sentences(30, 2), sentences(30, 3))
    run = load_run(make_run(tmp_path, corpus, head="adaptive", train_steps=0))
    model, V = run.model, run.tokenizer.vocab_size
    x, y = next(iter(make_loader(corpus, "train", 1, 40)))
    out = model(x, model.init_hidden(1), y)
    keys, tg = out.output[:, 0], y[:, 0]
    hist_k, hist_v, q = keys[:30], tg[:30], keys[30:]
    full = full_cache_distribution(q, hist_k, hist_v, V, theta=0.8)       # [10, V]
    assert torch.allclose(full.sum(1), torch.ones(10), atol=1e-5)
    p = 0.75 * model.log_prob(out.output[30:, 0]).exp() + 0.25 * full    # any head's log_prob
    assert torch.allclose(p.sum(1), torch.ones(10), atol=1e-5)
    # the target-only cache (no vocabulary-sized work) gives the same probability of the target
    cache = NeuralCache(window=1000, theta=0.8)
    cache.step(keys[:30, None], tg[:30, None])
    for t in range(10):  # one position at a time so each sees exactly the 30 history entries
        c = NeuralCache(1000, 0.8)
        c.keys, c.values = cache.keys, cache.values
        pc, _ = c.step(keys[30 + t:31 + t, None], tg[30 + t:31 + t, None])
        lp = mix_log_prob(-out.nll[30 + t:31 + t], pc, 0.25)
        assert float(lp) == pytest.approx(float(p[t, tg[30 + t]].log()), abs=1e-5)


def test_search_and_cli(tmp_path, capsys):
    text = sentences(30, 7) * 4  # repeated text: the cache helps
    corpus = make_corpus(tmp_path, sentences(200, 1), text, text)
    run_dir = make_run(tmp_path, corpus, train_steps=10)
    run = load_run(run_dir)
    run.model.train()
    table = cache_search(run.model, make_loader(corpus, "valid", 10, 12), window=100)
    assert run.model.training  # the caller's mode comes back
    run.model.eval()
    assert len(table) == 77
    for row in table[:3]:  # each row equals a direct evaluation with its (theta, lambdah)
        s, n = evaluate_cache(run.model, make_loader(corpus, "valid", 10, 12),
                              CacheOptions(window=100, theta=row["theta"], lambdah=row["lambdah"]))
        assert row["nll"] == pytest.approx(s / n, rel=1e-9)
    step = run_dir / "checkpoints" / "step-00000001"
    before = sha256_dir(step)
    main(["eval", str(run_dir), "--split", "test", "--cache.search", "--cache.window=100"])
    res = json.loads((step / "eval-test-cache.json").read_text())
    best = min(res["search"], key=lambda r: r["nll"])
    assert res["cache"]["theta"] == best["theta"] and res["cache"]["lambdah"] == best["lambdah"]
    plain = evaluate_stream(run.model, make_loader(corpus, "test", 1, 12))
    assert res["nll"] < plain[0] / plain[1]  # the cache lowers perplexity on repeated text
    assert sha256_dir(step) == before
    assert "cache search on valid: best theta" in capsys.readouterr().out
