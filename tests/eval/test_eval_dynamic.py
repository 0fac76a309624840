"""Dynamic evaluation: lr 0 == plain, adapts to a repeated text, never touches the checkpoint
or the caller's model."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.corpus import make_corpus, sentences
from helpers.runs import make_run, sha256_dir
from helpers.runs import one_thread  # noqa: F401 (autouse fixture)
from dist_lm.__main__ import main
from dist_lm.eval.dynamic import DynamicEvaluator
from dist_lm.eval.evaluate import evaluate_stream, make_loader
from dist_lm.run.inference import load_run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dyn")
    repeated = sentences(6, 9) * 12  # the test text repeats: adapting to it must pay off
    corpus = make_corpus(root, sentences(200, 1), sentences(40, 2), repeated)
    return corpus, make_run(root, corpus, train_steps=20)


def test_lr_zero_equals_plain_and_model_untouched(setup):
    corpus, run_dir = setup
    run = load_run(run_dir)
    snapshot = {k: v.clone() for k, v in run.model.state_dict().items()}
    dyn = DynamicEvaluator(run.model)
    assert dyn.collect_stats(make_loader(corpus, "train", 8, 5), max_batches=10) == 10
    s0, n0 = dyn.evaluate(make_loader(corpus, "test", 1, 5), lr=0.0, decay=0.02)
    s, n = evaluate_stream(run.model, make_loader(corpus, "test", 1, 5))
    assert n0 == n and s0 == pytest.approx(s, rel=1e-6)
    s1, _ = dyn.evaluate(make_loader(corpus, "test", 1, 5), lr=3e-3, decay=0.02)
    assert s1 / n < 0.9 * s / n  # adapting to the repeated text lowers perplexity
    s2, _ = dyn.evaluate(make_loader(corpus, "test", 1, 5), lr=3e-3, decay=0.02)
    assert s2 == pytest.approx(s1, rel=1e-9)  # each evaluation restarts from the trained weights
    for k, v in run.model.state_dict().items():  # the caller's model never moved
        assert torch.equal(v, snapshot[k]), k


def test_cli_search_and_checkpoint_hash(setup, capsys):
    corpus, run_dir = setup
    step = run_dir / "checkpoints" / "step-00000001"
    before = sha256_dir(step)
    main(["eval", str(run_dir), "--split", "test", "--dynamic.lr=3e-3", "--dynamic.decay=0.02",
          "--dynamic.stat_batches=10", "--dynamic.stat_batch=8"])
    res = json.loads((step / "eval-test-dynamic.json").read_text())
    assert res["method"] == "dynamic" and res["dynamic"]["lr"] == 3e-3 and res["batch_size"] == 1
    plain = evaluate_stream(load_run(run_dir).model, make_loader(corpus, "test", 1, 5))
    assert res["tokens"] == plain[1] and res["nll"] < plain[0] / plain[1]
    main(["eval", str(run_dir), "--split", "valid", "--dynamic.search",
          "--dynamic.stat_batches=10", "--dynamic.stat_batch=8", "--dynamic.search_tokens=30"])
    res = json.loads((step / "eval-valid-dynamic.json").read_text())
    best = min(res["search"], key=lambda r: r["nll"])
    assert len(res["search"]) == 24 and res["dynamic"]["lr"] == best["lr"]
    assert all(r["tokens"] >= 30 for r in res["search"])
    assert sha256_dir(step) == before  # model.pt, DONE: byte for byte the same
    assert "dynamic search on valid: best lr" in capsys.readouterr().out
