"""The prepared-corpus handle (dist_lm.data.prepared) on the user's path: `prepare`'s default
output is where train looks, a missing corpus is refused by train and search alike with the
command that prepares it, and the loaders get the window cap and rank split they document."""

from __future__ import annotations

import pytest

from dist_lm.config import Config
from dist_lm.data.prepare import prepare_corpus
from dist_lm.data.prepared import PreparedCorpus
from dist_lm.errors import UserError
from dist_lm.search.loop import Search
from dist_lm.train.trainer import Trainer


def test_prepare_writes_where_the_config_looks(tmp_path, monkeypatch):
    src = tmp_path / "my corpus"
    src.mkdir()
    for split in ("train", "valid", "test"):
        (src / f"{split}.txt").write_text("the cat sat on the mat\n" * 5)
    monkeypatch.chdir(tmp_path)
    out = prepare_corpus(f"text:{src}", download=False, workers=1, quiet=True)
    cfg = Config()
    cfg.data.corpus = f"text:{src}"
    assert out.parent.name == "shards" and ":" not in out.name and "/" not in out.name
    assert cfg.shards_dir().resolve() == out.resolve()
    corpus = PreparedCorpus.open(cfg.shards_dir(), cfg.data.corpus)
    assert corpus.vocab_size == 6 and not corpus.char_level  # 5 words + <eos>


@pytest.mark.parametrize("user", [Trainer, Search])
def test_a_missing_corpus_is_refused_with_the_prepare_command(user, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = Config()
    cfg.data.corpus = "wikitext2"
    cfg.train.device = "cpu"
    cfg.train.run_dir = str(tmp_path / "run")
    with pytest.raises(UserError) as err:
        user(cfg)
    assert str(err.value) == ("no prepared corpus at shards/wikitext2; run `dist-lm prepare "
                              "wikitext2` or set data.shards.")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_loader_defaults_and_rank_split(ptb_slice):
    corpus = PreparedCorpus.open(ptb_slice, "ptb")
    assert corpus.loader("train", 4, 30, variable=True).max_seq_len == 50  # bptt + 20
    capped = corpus.loader("train", 4, 30, variable=True, seed=2, max_seq_len=33)
    lengths = [x.shape[0] for x, _ in capped]
    assert max(lengths) == 33 and len(set(lengths)) > 2  # drawn, and capped where it was told
    assert corpus.loader("train", 4, 30).max_seq_len == 0  # fixed windows: no cap needed
    shared, reduce = corpus.eval_loader("valid", 4, 12, rank=1, world=2)
    assert reduce and (shared.rank, shared.world_size, shared.b) == (1, 2, 2)
    whole, reduce = corpus.eval_loader("valid", 3, 12, rank=1, world=2)
    assert not reduce and (whole.rank, whole.world_size, whole.b) == (0, 1, 3)
