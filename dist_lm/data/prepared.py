"""A prepared corpus (the output of `dist-lm prepare`): where it lives, its vocabulary, its loaders.

    corpus = PreparedCorpus.open(cfg.shards_dir(), cfg.data.corpus, device=device)
    corpus.vocab_size, corpus.char_level, corpus.tokenizer
    train = corpus.loader("train", 80, bptt=70, variable=True, seed=141, rank=r, world=W)
    valid, reduce = corpus.eval_loader("valid", 10, bptt=70, rank=r, world=W)

Train, search and eval open their corpus here, so the check that it is there, the default
window cap and the rank split of evaluation streams are decided once.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ..errors import UserError
from .shards import MANIFEST
from .tokenizers import Tokenizer, load_tokenizer


def default_dir(corpus: str) -> Path:
    """Where `dist-lm prepare CORPUS` writes by default: shards/<CORPUS, ':' and '/' as '_'>."""
    return Path("shards") / corpus.replace(":", "_").replace("/", "_")


def window_cap(bptt: int, max_seq_len: int = 0) -> int:
    """The longest window variable BPTT may draw: max_seq_len, 0 meaning bptt + 20 (the draw
    is N(bptt, 5): four standard deviations above, and memory stays bounded)."""
    return max_seq_len or bptt + 20


class PreparedCorpus:
    """A prepared corpus directory; `open` checks it is one. Loaders read onto `device`, from
    the local shards or through `shard_url` (a WebDataset URL template, see StreamLoader)."""

    def __init__(self, directory: str | os.PathLike, *, shard_url: str | None = None,
                 device="cpu"):
        self.dir = Path(directory)
        self.shard_url = shard_url or None
        self.device = device

    @classmethod
    def open(cls, directory: str | os.PathLike, corpus: str, *, fix: str = "set data.shards",
             shard_url: str | None = None, device="cpu") -> "PreparedCorpus":
        """The corpus at `directory`, its vocabulary read; a missing one is refused, naming
        `dist-lm prepare <corpus>` or `fix` (the other way to point at one) as the remedy."""
        prepared = cls(directory, shard_url=shard_url, device=device)
        if not (prepared.dir / MANIFEST).is_file():
            raise UserError(f"no prepared corpus at {prepared.dir}; run `dist-lm prepare "
                            f"{corpus}` or {fix}.")
        prepared.tokenizer  # noqa: B018 (read now: a damaged vocab.json stops the caller here)
        return prepared

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.dir)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def char_level(self) -> bool:
        """Scored in bits per character (char and byte vocabularies), not perplexity."""
        return self.tokenizer.kind in ("char", "byte")

    def loader(self, split: str, batch: int, bptt: int, *, variable: bool = False,
               seed: int = 0, max_seq_len: int = 0, rank: int = 0, world: int = 1):
        """A StreamLoader over `split` cut into `batch` streams, this rank's share of them;
        variable BPTT draws from `seed` and is capped at window_cap(bptt, max_seq_len)."""
        from .streams import StreamLoader  # torch loads only when a loader is made

        return StreamLoader(self.dir, split, batch, rank=rank, world_size=world, bptt=bptt,
                            variable_bptt=variable, seed=seed,
                            max_seq_len=window_cap(bptt, max_seq_len) if variable else 0,
                            device=self.device, shard_url=self.shard_url)

    def eval_loader(self, split: str, batch: int, bptt: int, *, rank: int = 0, world: int = 1):
        """(loader, reduce): fixed windows; each rank reads its share of the streams when
        they divide over the ranks (the sums are then all-reduced), else all of them."""
        if batch % world == 0:
            return self.loader(split, batch, bptt, rank=rank, world=world), True
        return self.loader(split, batch, bptt), False
