"""Evaluation protocols: reference == naive token by token, 2 ranks == 1, results JSON, bpc,
bad input (unfinished checkpoint, vocabulary mismatch, unknown option)."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from helpers.cli import run_ok, torchrun
from helpers.corpus import make_corpus, sentences, split_ids
from helpers.runs import make_run, sha256_dir
from helpers.runs import one_thread  # noqa: F401 (autouse fixture)
from dist_lm.__main__ import main
from dist_lm.eval.evaluate import FAST_BATCH, evaluate_run
from dist_lm.run.inference import load_run



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalp")
    corpus = make_corpus(root, sentences(300, 1), sentences(60, 2), sentences(40, 3))
    return root, corpus, make_run(root, corpus)


@torch.no_grad()
def naive_nll(model, ids: list[int], streams: int) -> tuple[float, int]:
    """Cut into `streams` contiguous pieces and feed one token at a time, hidden carried."""
    L = len(ids) // streams
    total, n = 0.0, 0
    for j in range(streams):
        s = ids[j * L:(j + 1) * L]
        hidden = model.init_hidden(1)
        for t in range(L - 1):
            out = model(torch.tensor([[s[t]]]), hidden, torch.tensor([[s[t + 1]]]))
            hidden = out.hidden
            total += float(out.nll.sum())
            n += 1
    return total, n


@pytest.mark.parametrize("split,streams", [("test", 1), ("valid", 10)])
def test_reference_protocol_equals_token_by_token(setup, split, streams):
    root, corpus, run_dir = setup
    run = load_run(run_dir)
    res = evaluate_run(run, split=split, log=lambda *a: None)
    assert res["batch_size"] == streams and res["method"] == "plain"
    total, n = naive_nll(run.model, split_ids(corpus, split), streams)
    assert res["tokens"] == n
    assert res["nll"] == pytest.approx(total / n, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(total / n), rel=1e-5)


def test_fast_protocol_uses_more_streams(setup):
    _, corpus, run_dir = setup
    run = load_run(run_dir)
    res = evaluate_run(run, split="valid", protocol="fast", batch_size=4, log=lambda *a: None)
    total, n = naive_nll(run.model, split_ids(corpus, "valid"), 4)
    assert res["tokens"] == n and res["nll"] == pytest.approx(total / n, rel=1e-5)
    # without a batch size the fast protocol takes FAST_BATCH streams (short windows: the
    # valid split has 408 tokens, 6 per stream)
    res = evaluate_run(run, split="valid", protocol="fast", bptt=4, log=lambda *a: None)
    total, n = naive_nll(run.model, split_ids(corpus, "valid"), FAST_BATCH)
    assert res["batch_size"] == FAST_BATCH and res["protocol"] == "fast"
    assert res["tokens"] == n and res["nll"] == pytest.approx(total / n, rel=1e-5)


def test_unknown_protocol_is_refused_on_every_path(setup):
    from dist_lm.errors import UserError
    from dist_lm.eval.evaluate import DynamicOptions

    run = load_run(setup[2])
    for extra in ({}, {"dynamic": DynamicOptions()}):
        with pytest.raises(UserError, match="bogus"):
            evaluate_run(run, split="valid", protocol="bogus", log=lambda *a: None, **extra)


def test_cli_writes_json_beside_checkpoint_and_leaves_it_unchanged(setup, capsys):
    _, _, run_dir = setup
    step = run_dir / "checkpoints" / "step-00000001"
    before = sha256_dir(step)
    main(["eval", str(run_dir), "--split", "test"])
    printed = capsys.readouterr().out
    res = json.loads((step / "eval-test.json").read_text())
    assert "test ppl" in printed and res["split"] == "test" and res["tokens"] > 0
    assert sha256_dir(step) == before  # model.pt and DONE untouched
    assert not any(p.name.endswith(".tmp") for p in step.iterdir())


@pytest.mark.slow
def test_two_ranks_equal_one_process(setup):
    _, _, run_dir = setup
    single = evaluate_run(load_run(run_dir), split="valid", log=lambda *a: None)
    proc = run_ok([*torchrun(2), "-m", "dist_lm", "eval", run_dir, "--split", "valid"],
                  timeout=240)
    res = json.loads((run_dir / "checkpoints" / "step-00000001" / "eval-valid.json").read_text())
    assert res["world_size"] == 2 and res["batch_size"] == 10
    assert res["tokens"] == single["tokens"]
    assert res["nll"] == pytest.approx(single["nll"], rel=1e-6)
    assert proc.stdout.count("valid ppl") == 1  # rank 0 alone reports


def test_bits_per_character_for_char_corpus(tmp_path):
    text = "".join(" ".join(line.replace(" ", "_")) + "\n" for line in sentences(40, 5).splitlines())
    corpus = make_corpus(tmp_path, text, text[:600], text[:400], tokenizer="char")
    run_dir = make_run(tmp_path, corpus, arch="qrnn", train_steps=0)
    run = load_run(run_dir)
    res = evaluate_run(run, split="test", log=lambda *a: None)
    total, n = naive_nll(run.model, split_ids(corpus, "test"), 1)
    assert "ppl" not in res
    assert res["bpc"] == pytest.approx(total / n / math.log(2), rel=1e-5)


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dist-lm: error: ")
    return err[0]


def test_run_without_finished_checkpoint(tmp_path, capsys):
    corpus = make_corpus(tmp_path, sentences(100, 1), sentences(30, 2), sentences(30, 3))
    run_dir = make_run(tmp_path, corpus, train_steps=0)
    (run_dir / "checkpoints" / "step-00000001" / "DONE").unlink()
    msg = _cli_error(["eval", str(run_dir)], capsys)
    assert "no finished checkpoint" in msg
    msg = _cli_error(["eval", str(run_dir / "checkpoints" / "step-00000001")], capsys)
    assert "incomplete" in msg


def test_vocabulary_mismatch(setup, tmp_path, capsys):
    root, corpus, run_dir = setup
    # the run's vocab.json no longer fits the checkpoint's embedding
    other = make_corpus(tmp_path, sentences(100, 1) + "zebra quokka\n", sentences(5, 2),
                        sentences(5, 3), name="bigger")
    bad_run = make_run(tmp_path, corpus, train_steps=0, name="badrun")
    (bad_run / "vocab.json").write_bytes((other / "vocab.json").read_bytes())
    msg = _cli_error(["eval", str(bad_run)], capsys)
    assert "does not fit the model" in msg and "vocabulary" in msg
    # the run is fine but the corpus given to evaluate it has another vocabulary
    msg = _cli_error(["eval", str(run_dir), "--corpus", str(other)], capsys)
    assert "vocabulary mismatch" in msg


def test_unknown_option_suggests_the_closest(setup, capsys):
    _, _, run_dir = setup
    msg = _cli_error(["eval", str(run_dir), "--cache.windw=3"], capsys)
    assert "unknown eval option --cache.windw. Did you mean --cache.window?" in msg


def test_result_goes_to_the_runs_wandb_when_it_used_it(setup, tmp_path, monkeypatch):
    from dist_lm.metrics.writer import wandb_id

    _, corpus, _ = setup
    run_dir = make_run(tmp_path, corpus, train_steps=0, name="wb")
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["log"]["wandb_mode"] = "offline"
    (run_dir / "config.json").write_text(json.dumps(cfg))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    main(["eval", str(run_dir), "--split", "valid"])
    files = list((run_dir / "wandb").glob(f"offline-run-*-{wandb_id(run_dir)}/run-*.wandb"))
    assert len(files) == 1
    for _ in range(100):  # wandb's service process may still be flushing the file
        if b"eval/valid/plain/ppl" in files[0].read_bytes():
            break
        time.sleep(0.2)
    assert b"eval/valid/plain/ppl" in files[0].read_bytes()
