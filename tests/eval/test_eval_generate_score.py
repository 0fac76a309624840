"""Generation (seeded, top-k/top-p, word/char, LSTM/QRNN, every head) and scoring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.cli import assert_clean_failure, run_cli
from helpers.corpus import make_corpus, sentences
from helpers.runs import make_run
from helpers.runs import one_thread  # noqa: F401 (autouse fixture)
from dist_lm.__main__ import main
from dist_lm.api import evaluate, generate, load_run, score_text
from dist_lm.config import Config, ModelConfig
from dist_lm.data.tokenizers import CharTokenizer
from dist_lm.errors import UserError
from dist_lm.eval.generate import detokenize, filter_logits, sample_ids, start_ids
from dist_lm.models import build_model
from dist_lm.run.inference import Run


@pytest.fixture(scope="module")
def word(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    corpus = make_corpus(root, sentences(200, 1) + "<unk> sat\n", sentences(30, 2), sentences(30, 3))
    return corpus, make_run(root, corpus, train_steps=20)


def test_filter_logits_top_k_top_p():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logp, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logp, top_k=2)[0, :2]).all()
    kept = torch.isfinite(filter_logits(logp, top_p=0.7))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert torch.isfinite(filter_logits(logp, top_p=0.01))[0].tolist() == [True, False, False, False]
    t = torch.softmax(filter_logits(logp, temperature=0.5), -1)
    assert torch.allclose(t, torch.softmax(2 * logp, -1))


def test_generation_is_reproducible_and_seed_dependent(word):
    _, run_dir = word
    run = load_run(run_dir)
    a = generate(run, prompt="the cat", length=25, seed=3, samples=2)
    assert a == generate(run, prompt="the cat", length=25, seed=3, samples=2)
    assert a != generate(run, prompt="the cat", length=25, seed=4, samples=2)
    assert all(t.startswith("the cat") for t in a) and a[0] != a[1]
    words = set(run.tokenizer.itos)
    assert all(w in words for t in a for w in t.split())
    # top_k = 1 is greedy decoding: the argmax of the model's distribution at every step
    ctx = [run.tokenizer.eos_id]
    ids = sample_ids(run.model, ctx, 8, top_k=1, seed=0)[0]
    with torch.no_grad():
        seq = ctx + ids
        out = run.model(torch.tensor(seq[:-1]).unsqueeze(1), run.model.init_hidden(1))
        greedy = run.model.log_prob(out.output)[:, 0].argmax(-1).tolist()
    assert ids == greedy
    assert generate(run, prompt="", length=0) == [""]


@pytest.mark.parametrize("arch,head", [("qrnn", "adaptive"), ("lstm", "mos")])
def test_generation_char_vocab_and_heads(tmp_path, arch, head):
    text = sentences(60, 5)
    corpus = make_corpus(tmp_path, text, text[:400], text[:400], tokenizer="char")
    run = load_run(make_run(tmp_path, corpus, arch=arch, head=head, train_steps=5))
    out = generate(run, prompt="the cat", length=30, top_p=0.9, seed=1)
    assert out == generate(run, prompt="the cat", length=30, top_p=0.9, seed=1)
    assert out[0].startswith("the cat") and len(out[0]) == len("the cat") + 30


def test_ptb_char_prompt_and_output_use_spaces():
    tok = CharTokenizer(list("abcehtz_") + ["<eos>"], split="whitespace")  # PTB-char's format
    cfg = ModelConfig(emb_size=8, hidden_size=8, n_layers=1)
    run = Run(build_model(cfg, tok.vocab_size).eval(), Config(), tok, Path("."), False)
    assert start_ids(tok, "the cat") == [tok.eos_id] + tok.encode_line("t h e _ c a t")[:-1]
    assert detokenize(tok, [tok.stoi["a"], tok.stoi["_"], tok.stoi["b"], tok.eos_id]) == "a b\n"
    out = generate(run, prompt="the cat", length=40, seed=2)[0]
    assert out.startswith("the cat") and "_" not in out and "<eos>" not in out


@torch.no_grad()
def test_score_line_equals_direct_log_probabilities(word):
    _, run_dir = word
    run = load_run(run_dir)
    tok, model = run.tokenizer, run.model
    lines = ["the cat sat on a mat", "zebra sat on the giraffe", "red house"]
    recs = score_text(run, "\n".join(lines) + "\n\n")  # the blank line is skipped
    assert [r["line"] for r in recs] == [1, 2, 3]
    for line, rec in zip(lines, recs):
        ids = tok.encode_line(line)                  # ... + <eos>
        inp = torch.tensor([tok.eos_id] + ids[:-1]).unsqueeze(1)
        lp = model.log_prob(model(inp, model.init_hidden(1)).output)[:, 0]
        direct = lp.gather(1, torch.tensor(ids).unsqueeze(1))[:, 0].double()
        assert rec["tokens"] == [tok.itos[i] for i in ids]
        assert rec["logprobs"] == pytest.approx(direct.tolist(), abs=1e-5)
        assert rec["total"] == pytest.approx(float(direct.sum()), abs=1e-4)
        assert rec["avg"] == pytest.approx(rec["total"] / len(ids))
    assert recs[1]["n_unk"] == 2 and recs[1]["tokens"][0] == "<unk>" and recs[0]["n_unk"] == 0
    # the whole text as one stream: the hidden state runs across lines
    whole = score_text(run, "\n".join(lines) + "\n", per="text")[0]
    ids = tok.encode("\n".join(lines) + "\n")
    out = model(torch.tensor([tok.eos_id] + ids[:-1]).unsqueeze(1), model.init_hidden(1),
                torch.tensor(ids).unsqueeze(1))
    assert whole["n_tokens"] == len(ids) and whole["n_unk"] == 2
    assert whole["total"] == pytest.approx(-float(out.nll.double().sum()), abs=1e-4)


def test_score_cli_and_empty_file(word, tmp_path, capsys):
    _, run_dir = word
    src = tmp_path / "in.txt"
    src.write_text("the cat sat\nred house\n")
    out = tmp_path / "scores.jsonl"
    main(["score", str(run_dir), str(src), "--out", str(out)])
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in recs] == ["the cat sat", "red house"]
    assert recs == score_text(run_dir, src.read_text())
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SystemExit) as e:
        main(["score", str(run_dir), str(empty)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to score" in err[0] and str(empty) in err[0]


def test_api_evaluate_matches_cli_result(word):
    corpus, run_dir = word
    res = evaluate(str(run_dir), split="valid")
    assert res["batch_size"] == 10 and res["method"] == "plain" and res["ppl"] > 1
    cached = evaluate(str(run_dir), split="valid", cache={"window": 20, "lambdah": 0.0})
    assert cached["nll"] == pytest.approx(res["nll"], rel=1e-9)
    # a misspelt or bad option is config.py's one-line UserError, as on the command line
    with pytest.raises(UserError, match=r"unknown cache option 'windw'\. Did you mean 'window'\?"):
        evaluate(str(run_dir), cache={"windw": 3})
    with pytest.raises(UserError, match=r"--cache\.window must be >= 1; got 0"):
        evaluate(str(run_dir), cache={"window": 0})
    with pytest.raises(UserError, match="dynamic option 'lr' expects a number"):
        evaluate(str(run_dir), dynamic={"lr": "fast"})


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_byte_and_bpe_generate_and_score(tmp_path, kind):
    text = sentences(80, 6)
    corpus = make_corpus(tmp_path, text, text[:300], text[:300], tokenizer=kind)
    run = load_run(make_run(tmp_path, corpus, train_steps=0))
    out = generate(run, prompt="the cat", length=12, seed=5)
    assert out == generate(run, prompt="the cat", length=12, seed=5)
    assert out[0].startswith("the cat")
    # every vocabulary has an <eos> (byte: the newline byte), so a line's first token is scored
    assert run.tokenizer.itos[run.tokenizer.eos_id] == ("\n" if kind == "byte" else "<eos>")
    rec = score_text(run, "the red house\n")[0]
    ids = run.tokenizer.encode_line("the red house")
    assert "n_context" not in rec and rec["tokens"][0] == run.tokenizer.itos[ids[0]]
    assert rec["n_tokens"] == len(ids) and rec["n_unk"] == 0
    with torch.no_grad():
        m = run.model
        o = m(torch.tensor([run.tokenizer.eos_id] + ids[:-1]).unsqueeze(1), m.init_hidden(1),
              torch.tensor(ids).unsqueeze(1))
    assert rec["total"] == pytest.approx(-float(o.nll.double().sum()), abs=1e-4)


def test_score_reads_standard_input_like_a_file(word, tmp_path):
    """`dist-lm score RUN -` (fire alone would take the bare `-` as its own separator)."""
    _, run_dir = word
    text = "the cat sat\n\nred house when it rained\n"
    src = tmp_path / "in.txt"
    src.write_text(text)
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}  # stdin is read as UTF-8 bytes regardless
    from_file = run_cli("score", str(run_dir), str(src), env=env)
    assert from_file.returncode == 0, from_file.stderr
    assert [json.loads(x)["text"] for x in from_file.stdout.splitlines()] == [
        "the cat sat", "red house when it rained"]
    for args in (["-"], ["--file", "-"], ["-", "--per", "line"]):
        piped = subprocess.run([sys.executable, "-m", "dist_lm", "score", str(run_dir), *args],
                               input=text, capture_output=True, text=True, env=env, timeout=300)
        assert piped.returncode == 0, (args, piped.stderr)
        assert piped.stdout == from_file.stdout, args
    # compared exactly with score_text in this process, which runs on one thread (one_thread):
    # the CLI's on one thread too (a different thread count may round a GEMM's last bit)
    whole = subprocess.run([sys.executable, "-m", "dist_lm", "score", str(run_dir), "-", "--per",
                            "text"], input=text, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert [json.loads(x) for x in whole.stdout.splitlines()] == score_text(
        run_dir, text, per="text")
    empty = subprocess.run([sys.executable, "-m", "dist_lm", "score", str(run_dir), "-"],
                           input="\n \n", capture_output=True, text=True, timeout=300)
    assert_clean_failure(empty, "nothing to score", "standard input")
