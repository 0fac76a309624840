"""prepare + tokenizers + shards + verify, on the real corpora in ../shared/data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers.cli import assert_clean_failure, run_cli
from helpers.corpus import corrupt_copy, read_split, reference_ids
import dist_lm.data.prepare as prepare_mod
from dist_lm.data.corpora import PRESETS, holdout_ranges
from dist_lm.data.prepare import prepare_corpus
from dist_lm.data.shards import verify_corpus
from dist_lm.data.tokenizers import load_tokenizer
from dist_lm.errors import UserError

PTB_TOKENS = {"train": 929_589, "valid": 73_760, "test": 82_430}


@pytest.fixture(scope="module")
def ptb(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("prep") / "ptb"
    prepare_corpus("ptb", out=out, data_dir=shared_data, shard_tokens=300_000, quiet=True)
    return out


def test_ptb_counts_vocab_and_reference_ids(ptb, shared_data):
    m = json.loads((ptb / "manifest.json").read_text())
    assert m["vocab_size"] == 10_000 and m["dtype"] == "uint16" and m["tokenizer"] == "word"
    assert {s: m["splits"][s]["tokens"] for s in PTB_TOKENS} == PTB_TOKENS
    assert len(m["splits"]["train"]["shards"]) == 4  # 300k tokens -> 4 chunks of 65536 per shard
    # ids are AWD-LSTM's Dictionary ids (first appearance), token for token
    w2i, ref = reference_ids([shared_data / "ptb" / f"ptb.{s}.txt" for s in PTB_TOKENS])
    tok = load_tokenizer(ptb)
    assert tok.itos == list(w2i) and tok.vocab_size == 10_000
    assert tok.itos[:3] == ["aer", "banknote", "berlitz"]
    for split, ids in zip(PTB_TOKENS, ref):
        assert np.array_equal(read_split(ptb, split), np.array(ids))
    # <unk> is PTB's own token; counted per split
    assert m["splits"]["train"]["unk"] == int((np.array(ref[0]) == w2i["<unk>"]).sum()) == 45_020
    assert [m["splits"][s]["oov"] for s in PTB_TOKENS] == [0, 0, 0]  # its own <unk> is in train


def test_tokenizer_api_round_trip(ptb, shared_data):
    tok = load_tokenizer(ptb / "vocab.json")
    assert tok.kind == "word" and tok.eos_id == tok.stoi["<eos>"] and tok.unk_id == tok.stoi["<unk>"]
    text = (shared_data / "ptb" / "ptb.valid.txt").read_text()
    ids = tok.encode(text)
    assert np.array_equal(np.array(ids), read_split(ptb, "valid"))
    assert tok.encode_line(" the cat \n") == [tok.stoi["the"], tok.stoi["cat"], tok.eos_id]
    assert tok.encode_line("zyzzyva") == [tok.unk_id, tok.eos_id]
    assert tok.decode(tok.encode("the market fell\nN years ago")) == "the market fell\nN years ago\n"


def test_shards_are_byte_identical_and_verify(ptb, shared_data, tmp_path):
    again = prepare_corpus("ptb", out=tmp_path / "again", data_dir=shared_data,
                           shard_tokens=300_000, quiet=True)
    names = sorted(p.name for p in ptb.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for n in names:
        assert (ptb / n).read_bytes() == (again / n).read_bytes(), n
    verify_corpus(again, quiet=True)
    # preparing again into an existing corpus directory replaces it in place
    prepare_corpus("ptb", out=again, data_dir=shared_data, shard_tokens=300_000, quiet=True)
    assert [p.name for p in tmp_path.iterdir()] == ["again"]


def test_worker_processes_give_identical_shards(ptb, shared_data, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_mod, "BLOCK_BYTES", 100_000)  # ~50 blocks: the pool is used
    out = prepare_corpus("ptb", out=tmp_path / "par", data_dir=shared_data, shard_tokens=300_000,
                         workers=2, quiet=True)
    for p in ptb.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    d = tmp_path / "bad"
    d.mkdir()
    (d / "train.txt").write_bytes(b"fine words\n" * 50_000 + b"caf\xe9\n" + b"more\n" * 10)
    (d / "valid.txt").write_text("a\n")
    (d / "test.txt").write_text("a\n")
    with pytest.raises(UserError, match=r"train.txt is not UTF-8 text .*at byte 550003"):
        prepare_corpus(f"text:{d}", out=tmp_path / "o", workers=2, quiet=True)
    assert not (tmp_path / "o").exists()


def test_flipped_byte_truncation_and_manifest_mismatch_are_named(ptb, tmp_path):
    bad = corrupt_copy(ptb, tmp_path / "bad", "train-000002.tar", 100_000, 0x40)
    res = run_cli("verify", str(bad))
    assert_clean_failure(res, "train-000002.tar", "sha256", "dist-lm prepare")

    shutil.rmtree(bad)
    shutil.copytree(ptb, bad)
    shard = bad / "valid-000000.tar"
    shard.write_bytes(shard.read_bytes()[:50_000])
    assert_clean_failure(run_cli("verify", str(bad)), "valid-000000.tar")

    shutil.rmtree(bad)
    shutil.copytree(ptb, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["splits"]["test"]["shards"][0]["tokens"] -= 1
    m["splits"]["test"]["tokens"] -= 1
    (bad / "manifest.json").write_text(json.dumps(m))
    assert_clean_failure(run_cli("verify", str(bad)), "test-000000.tar", "manifest says")

    res = run_cli("verify", str(ptb))
    assert res.returncode == 0 and "all shards verified" in res.stdout


def test_oov_rate_is_printed_recorded_and_warned_when_train_has_no_unk(tmp_path, capsys):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "train.txt").write_text("the cat sat on the mat\n" * 20)
    (d / "valid.txt").write_text("the cat sat on the mat\n" * 28 + "the cat sat on a mat\n")
    (d / "test.txt").write_text("the dog sat on the rug\n" * 10)
    out = prepare_corpus(f"text:{d}", out=tmp_path / "o")
    got = capsys.readouterr()
    m = json.loads((out / "manifest.json").read_text())
    assert [m["splits"][s]["oov"] for s in ("train", "valid", "test")] == [0, 1, 20]
    assert "valid: 203 tokens, 1 <unk>, 0.49% not in the train vocabulary" in got.out
    assert "test: 70 tokens, 20 <unk>, 28.57% not in the train vocabulary" in got.out
    (line,) = [ln for ln in got.err.splitlines() if "warning" in ln]  # one line, test only
    assert line.startswith("dist-lm: warning: 28.6% of the test tokens are not in the train vocabulary")
    assert "valid" not in line and "--max_vocab N" in line and "--min_freq" in line
    # capped: rare train words are <unk> too, so the model learns it: no warning
    out2 = prepare_corpus(f"text:{d}", out=tmp_path / "o2", max_vocab=5)
    m2 = json.loads((out2 / "manifest.json").read_text())
    assert m2["splits"]["train"]["unk"] == 40 and m2["splits"]["test"]["oov"] == 20
    assert "warning" not in capsys.readouterr().err
    # no word of valid/test is new: nothing to warn about
    for split in ("valid", "test"):
        shutil.copy(d / "train.txt", d / f"{split}.txt")
    out3 = prepare_corpus(f"text:{d}", out=tmp_path / "o3")
    got3 = capsys.readouterr()
    assert "test: 140 tokens, 0 <unk>, 0.00% not in the train vocabulary" in got3.out
    assert "warning" not in got3.err
    assert json.loads((out3 / "manifest.json").read_text())["splits"]["test"]["oov"] == 0


def test_ptb_char_has_50_symbols(shared_data, tmp_path):
    out = prepare_corpus("ptb-char", out=tmp_path / "pc", data_dir=shared_data, quiet=True)
    m = json.loads((out / "manifest.json").read_text())
    tok = load_tokenizer(out)
    assert tok.kind == "char" and m["vocab_size"] == tok.vocab_size == 50 and tok.unk_id is None
    # symbols + one <eos> per line; each file ends in " \n " whose last line (" ") gets an <eos>
    # too, exactly like AWD-LSTM's line iteration (README counts newlines only: one less)
    assert [m["splits"][s]["tokens"] for s in ("train", "valid", "test")] == \
        [5_017_482 + 1, 393_042 + 1, 442_423 + 1]
    line = "a e r _ b a n k n o t e"
    assert tok.decode(tok.encode_line(line)) == line + "\n"


def test_text_dir_word_vocab_limits_and_unk(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "train.txt").write_text("a b c a\nb a d\n\ne e e e")  # last line without newline
    (d / "valid.txt").write_text("a z\n")
    (d / "test.txt").write_text("q\r\nb\n")
    out = prepare_corpus(f"text:{d}", out=tmp_path / "o1", chunk_len=3, quiet=True)
    tok = load_tokenizer(out)
    # first appearance order, <eos> after the first line, <unk> appended for unseen valid/test words
    assert tok.itos == ["a", "b", "c", "<eos>", "d", "e", "<unk>"]
    assert read_split(out, "train").tolist() == [0, 1, 2, 0, 3, 1, 0, 4, 3, 3, 5, 5, 5, 5, 3]
    m = json.loads((out / "manifest.json").read_text())
    assert [m["splits"][s]["unk"] for s in ("train", "valid", "test")] == [0, 1, 1]
    assert read_split(out, "test").tolist() == [6, 3, 1, 3]  # \r\n is a newline

    out2 = prepare_corpus(f"text:{d}", out=tmp_path / "o2", max_vocab=4, quiet=True)
    tok2 = load_tokenizer(out2)
    assert tok2.itos == ["a", "<eos>", "e", "<unk>"]  # most frequent; order of appearance kept
    assert json.loads((out2 / "manifest.json").read_text())["splits"]["train"]["unk"] == 4

    out3 = prepare_corpus(f"text:{d}", out=tmp_path / "o3", min_freq=3, quiet=True)
    assert load_tokenizer(out3).itos == ["a", "<eos>", "e", "<unk>"]


def test_text_dir_char_and_byte_tokenizers(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    text = "héllo wörld\nnaïve ☃\n"
    for s in ("train", "valid", "test"):
        (d / f"{s}.txt").write_text(text if s != "test" else "hé?\n", encoding="utf-8")
    out = prepare_corpus(f"text:{d}", tokenizer="char", out=tmp_path / "c", chunk_len=4, quiet=True)
    tok = load_tokenizer(out)
    assert tok.itos[:5] == ["h", "é", "l", "o", " "] and "<eos>" in tok.itos and tok.unk_id is not None
    ids = read_split(out, "train").tolist()
    assert ids == tok.encode(text) and tok.decode(ids) == text
    assert read_split(out, "test").tolist() == [tok.stoi["h"], tok.stoi["é"], tok.unk_id, tok.eos_id]

    outb = prepare_corpus(f"text:{d}", tokenizer="byte", out=tmp_path / "b", quiet=True)
    tb = load_tokenizer(outb)
    assert tb.vocab_size == 256 and tb.eos_id == 10
    assert bytes(read_split(outb, "train").astype(np.uint8)) == text.encode()
    assert tb.decode(read_split(outb, "train")) == text


def test_enwik8_split_on_a_generated_byte_file(tmp_path):
    assert PRESETS["enwik8"].holdout == 5_000_000
    assert holdout_ranges(100_000_000, 5_000_000) == {
        "train": (0, 90_000_000), "valid": (90_000_000, 95_000_000), "test": (95_000_000, 100_000_000)}
    raw = np.random.default_rng(0).integers(0, 256, 10_300_000, dtype=np.uint8).tobytes()
    (tmp_path / "enwik8").mkdir()
    (tmp_path / "enwik8" / "enwik8").write_bytes(raw)
    out = prepare_corpus("enwik8", out=tmp_path / "e8", data_dir=tmp_path, download=False,
                         shard_tokens=1 << 20, chunk_len=1 << 16, quiet=True)
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer"] == "byte" and m["vocab_size"] == 256
    assert m["sources"]["valid"] == {"file": "enwik8", "bytes": [300_000, 5_300_000]}
    got = {s: bytes(read_split(out, s).astype(np.uint8)) for s in ("train", "valid", "test")}
    assert got == {"train": raw[:300_000], "valid": raw[300_000:5_300_000], "test": raw[5_300_000:]}
    (tmp_path / "enwik8" / "enwik8").write_bytes(raw[:9_000_000])
    with pytest.raises(UserError, match="too few for the enwik8 split"):
        prepare_corpus("enwik8", out=tmp_path / "e8b", data_dir=tmp_path, download=False, quiet=True)


def test_text8_char_split_on_a_generated_file(tmp_path):
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", np.uint8)
    raw = letters[np.random.default_rng(1).integers(0, 27, 10_050_000)].tobytes()
    (tmp_path / "text8").mkdir()
    (tmp_path / "text8" / "text8").write_bytes(raw)
    out = prepare_corpus("text8", out=tmp_path / "t8", data_dir=tmp_path, download=False, quiet=True)
    tok = load_tokenizer(out)
    assert tok.kind == "char" and tok.vocab_size == 28  # 27 characters + <eos>
    test = read_split(out, "test")
    assert len(test) == 5_000_001 and test[-1] == tok.eos_id  # one line without newline
    assert tok.decode(test[:-1]) == raw[5_050_000:].decode()
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["train"]["tokens"] == 50_001


def test_out_dir_that_is_not_a_corpus_is_refused(shared_data, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="exists and is not a prepared corpus"):
        prepare_corpus("ptb", out=tmp_path / "mine", data_dir=shared_data)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_wikitext2_uses_local_valid_test_and_names_missing_train(shared_data, tmp_path):
    with pytest.raises(UserError, match=r"wiki\.train\.tokens not found.*download"):
        prepare_corpus("wikitext-2", out=tmp_path / "w", data_dir=shared_data, download=False)
    assert not (tmp_path / "w").exists()
    # the wikitext-2 files are plain word-level text: valid as a text corpus gives the
    # published counts (13,777 types incl. <eos>, 217,646 tokens)
    d = tmp_path / "wt"
    d.mkdir()
    for s, f in (("train", "valid"), ("valid", "valid"), ("test", "valid")):
        shutil.copy(shared_data / "wikitext-2" / f"wiki.{f}.tokens", d / f"{s}.txt")
    out = prepare_corpus(f"text:{d}", out=tmp_path / "wto", quiet=True)
    m = json.loads((out / "manifest.json").read_text())
    assert m["vocab_size"] == 13_777 and m["splits"]["train"]["tokens"] == 217_646


def test_bpe_tokenizer(shared_data, tmp_path):
    pytest.importorskip("tokenizers")
    d = tmp_path / "shakespeare"
    d.mkdir()
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    lines = text.splitlines(keepends=True)
    (d / "train.txt").write_text("".join(lines[:4000]))
    (d / "valid.txt").write_text("".join(lines[4000:4400]))
    (d / "test.txt").write_text("".join(lines[4400:4800]))
    out = prepare_corpus(f"text:{d}", tokenizer="bpe", bpe_vocab=500, out=tmp_path / "bpe", quiet=True)
    tok = load_tokenizer(out)
    assert tok.kind == "bpe" and 300 < tok.vocab_size <= 500 and tok.eos_id is not None
    valid = "".join(lines[4000:4400])
    ids = read_split(out, "valid").tolist()
    assert ids == tok.encode(valid) and tok.decode(ids) == valid
    a = prepare_corpus(f"text:{d}", tokenizer="bpe", bpe_vocab=500, out=tmp_path / "bpe2", quiet=True)
    assert (a / "train-000000.tar").read_bytes() == (out / "train-000000.tar").read_bytes()


# ----------------------------------------------------------------------------- bad input, CLI


def _corpus(tmp_path, **files):
    d = tmp_path / "in"
    d.mkdir()
    for s in ("train", "valid", "test"):
        data = files.get(s, "a b\n")
        (d / f"{s}.txt").write_bytes(data if isinstance(data, bytes) else data.encode())
    return d


@pytest.mark.parametrize("case", ["missing", "empty", "non_utf8", "preset_missing"])
def test_bad_input_cli_is_one_line_and_leaves_nothing(tmp_path, case):
    out = tmp_path / "shards" / "x"
    if case == "missing":
        d = _corpus(tmp_path)
        (d / "valid.txt").unlink()
        args, needles = [f"text:{d}"], ["valid.txt not found"]
    elif case == "empty":
        d = _corpus(tmp_path, test="")
        args, needles = [f"text:{d}"], ["test.txt", "is empty"]
    elif case == "non_utf8":
        d = _corpus(tmp_path, valid="ok line\n".encode() * 1000 + b"caf\xe9\n")
        args, needles = [f"text:{d}"], ["valid.txt is not UTF-8", "--tokenizer byte"]
    else:
        args = ["ptb", "--data_dir", str(tmp_path / "nowhere"), "--download=False"]
        needles = ["ptb.train.txt not found", "nowhere"]
    res = run_cli("prepare", *args, "--out", str(out), cwd=tmp_path)
    assert_clean_failure(res, *needles)
    assert not (tmp_path / "shards").exists()  # no output, not even the parent it would create


def test_stale_partial_output_of_a_killed_prepare_is_removed(shared_data, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".ptb.partial-{dead}"
    stale.mkdir()
    (stale / "train-000000.tar").write_bytes(b"half")
    prepare_corpus("ptb", out=tmp_path / "ptb", data_dir=shared_data, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ptb"]


def test_text_dir_under_home_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    d = tmp_path / "corpus"
    d.mkdir()
    for split in ("train", "valid", "test"):
        (d / f"{split}.txt").write_text("a b\n")
    out = prepare_corpus("text:~/corpus", out=tmp_path / "o", quiet=True)  # as the shell passes it
    assert json.loads((out / "manifest.json").read_text())["splits"]["test"]["tokens"] == 3
