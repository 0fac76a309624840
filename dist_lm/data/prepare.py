"""`dist-lm prepare CORPUS`: raw text -> vocab.json + WebDataset tar shards + manifest.json.

    dist-lm prepare ptb --data_dir ../shared/data          # -> shards/ptb
    dist-lm prepare text:my_corpus --tokenizer char --out shards/mine

Two passes with bounded memory, whatever the corpus size:

A. Text is read in blocks (cut at whitespace), split, and every token gets a provisional id
   in order of first appearance in train (a dict lookup per token, new words get the next
   id). The ids go to a temporary uint32 file per split; counts come from np.bincount.
   Valid/test use the frozen train table, unseen tokens get one "out of vocabulary" id.
B. With the vocabulary final (min_freq / max_vocab applied, `<unk>` added if anything maps
   to it), the provisional ids are remapped with one numpy lookup table and written as
   fixed-length chunks into tar shards (dist_lm/data/shards.py).

Memory: one text block, the vocabulary and one block of ids. The byte and bpe tokenizers
know their vocabulary up front and write shards directly in pass A.

Everything is written into a hidden sibling directory that is renamed to --out at the end;
on any error it is removed, so there is never a half-written corpus.
"""

from __future__ import annotations

import array
import io
import itertools
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from ..errors import UserError
from .corpora import SPLITS, Corpus, Source, resolve_corpus
from .prepared import default_dir
from .shards import MANIFEST, FORMAT, SplitWriter, dtype_for
from .tokenizers import EOS, KINDS, UNK, ByteTokenizer, CharTokenizer, WordTokenizer, train_bpe

BLOCK_CHARS = 1 << 22  # text read per step (pass A)
BLOCK_IDS = 1 << 22  # ids remapped per step (pass B)
BLOCK_BYTES = 1 << 22  # bytes of text per word-tokenizer block (pass A)
PIECE_CHARS = 1 << 15  # text split at once inside a block
_U32 = next(t for t in "ILH" if array.array(t).itemsize == 4)  # array typecode of uint32


# ----------------------------------------------------------------------------- reading text


class _RangeRaw(io.RawIOBase):
    """Bytes [start, end) of a file as a raw stream (enwik8/text8 splits of one file)."""

    def __init__(self, src: Source):
        self.f = open(src.path, "rb")
        self.f.seek(src.start)
        self.left = None if src.end is None else src.end - src.start

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = len(b) if self.left is None else min(len(b), self.left)
        if n <= 0:
            return 0
        got = self.f.readinto(memoryview(b)[:n])
        if self.left is not None:
            self.left -= got
        return got

    def close(self) -> None:
        self.f.close()
        super().close()


def source_size(src: Source) -> int:
    if not src.path.is_file():
        raise UserError(f"{src.path} not found; check the corpus directory.")
    end = src.path.stat().st_size if src.end is None else src.end
    return end - src.start


def _not_utf8(what, detail: str) -> UserError:
    return UserError(f"{what} is not UTF-8 text ({detail}); convert it to UTF-8, or use "
                     f"--tokenizer byte.")


def text_blocks(src: Source, block_chars: int = BLOCK_CHARS):
    """UTF-8 text in blocks, newlines translated like Python's line iteration. A last line
    without a newline still ends a line: a final "\\n" is yielded for it (AWD-LSTM adds
    `<eos>` to every line)."""
    f = io.TextIOWrapper(io.BufferedReader(_RangeRaw(src), 1 << 20), encoding="utf-8",
                         errors="strict", newline=None)
    last = ""
    with f:
        try:
            while block := f.read(block_chars):
                yield block
                last = block[-1]
        except UnicodeDecodeError as exc:
            snippet = exc.object[max(0, exc.start - 10):exc.end + 10]
            raise _not_utf8(src.describe(), f"{exc.reason} in {snippet!r}") from None
    if last and last != "\n":
        yield "\n"


def text_lines(src: Source):
    carry = ""
    for block in text_blocks(src):
        parts = (carry + block).split("\n")
        carry = parts.pop()
        yield from parts


# ----------------------------------------------------------------------------- pass A


class _Growing(dict):
    """word -> provisional id; an unseen word gets the next id (order of first appearance)."""

    def __missing__(self, key):
        v = self[key] = len(self)
        return v


class _Frozen(dict):
    """The train table for valid/test: unseen words map to `oov` (= train vocab size)."""

    def __init__(self, table: dict):
        super().__init__(table)
        self.oov = len(table)

    def __missing__(self, key):
        return self.oov


class _Counts:
    def __init__(self):
        self.c = np.zeros(0, np.int64)

    def add(self, ids: np.ndarray) -> None:
        b = np.bincount(ids)
        if len(b) > len(self.c):
            self.c = np.pad(self.c, (0, len(b) - len(self.c)))
        self.c[:len(b)] += b

    def upto(self, n: int) -> np.ndarray:
        return np.pad(self.c, (0, max(0, n - len(self.c))))[:n]


class _BlockTokenizer:
    """Splits byte ranges of a text file into words with ids local to this tokenizer (one per
    worker process, kept across blocks); reports the words it had not seen before."""

    def __init__(self):
        self.table = _Growing()
        self.new: list[str] = []
        self.table_missing = self.table.__missing__

    def __call__(self, path: str, a: int, b: int, last: bool) -> tuple[list[str], np.ndarray]:
        with open(path, "rb") as f:
            f.seek(a)
            data = f.read(b - a)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, f"{exc.reason} at byte {a + exc.start}") from None
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")  # as Python's line iteration
        if last and text and text[-1] != "\n":
            text += "\n"  # a last line without newline still ends with <eos>
        before = len(self.table)
        get, out, pos = self.table.__getitem__, [], 0
        while pos < len(text):
            # ~32 KB pieces: their word objects stay in cache between split and lookup
            # (1.5x faster than splitting the whole block); cut after a newline or space
            end = text.find("\n", pos + PIECE_CHARS)
            if end < 0:
                end = text.find(" ", pos + PIECE_CHARS)
            end = len(text) if end < 0 else end + 1
            words = text[pos:end].replace("\n", " " + EOS + " ").split()
            # array(map(...)): the fastest C-level loop over the dict (~25% over np.fromiter)
            out.append(array.array(_U32, map(get, words)))
            pos = end
        ids = np.frombuffer(b"".join(out), np.uint32)
        new = list(itertools.islice(self.table, before, None)) if len(self.table) > before else []
        return new, ids


_WORKER: _BlockTokenizer | None = None


def _worker_init() -> None:
    global _WORKER
    _WORKER = _BlockTokenizer()


def _worker_task(path: str, a: int, b: int, last: bool):
    new, ids = _WORKER(path, a, b, last)
    return os.getpid(), new, ids


def block_ranges(src: Source, block_bytes: int) -> list[tuple[int, int]]:
    """Cut [start, end) into ~block_bytes pieces, each ending just after a newline (or a
    space, for a line longer than a block), so no token or line ending is split."""
    end = src.start + source_size(src)
    cuts, a = [], src.start
    with open(src.path, "rb") as f:
        while a < end:
            b = a + block_bytes
            if b >= end:
                cuts.append((a, end))
                break
            f.seek(b)
            while True:
                look = f.read(1 << 16)
                if not look:
                    b = end
                    break
                nl = look.find(b"\n")
                cut = nl if nl >= 0 else look.rfind(b" ")
                if cut >= 0:
                    b = min(end, b + cut + 1)
                    break
                b += len(look)
            cuts.append((a, b))
            a = b
    return cuts


class WordEncoder:
    """Whitespace tokens (word, and PTB-char's spaced symbols), optionally on worker processes.

    Blocks are tokenized in any process, but merged here strictly in file order: a worker's
    new words are looked up in (or appended to) the global table in the order the worker
    first saw them, so ids are the order of first appearance whatever the parallelism."""

    def __init__(self, workers: int = 1):
        self.table: dict = _Growing()
        self.workers = workers
        self.pool = None
        self.inline = _BlockTokenizer()
        self.luts: dict = {}  # tokenizer (worker pid) -> its local id -> provisional id

    def freeze(self) -> None:
        self.table = _Frozen(self.table)

    @property
    def oov(self) -> int | None:
        return getattr(self.table, "oov", None)

    def blocks(self, src: Source):
        ranges = block_ranges(src, BLOCK_BYTES)
        jobs = [(str(src.path), a, b, k == len(ranges) - 1) for k, (a, b) in enumerate(ranges)]
        get = self.table.__getitem__
        for (_, a, b, _), (who, new, ids) in zip(jobs, self._run(jobs)):
            lut = self.luts.get(who, np.zeros(0, np.uint32))
            if new:
                lut = np.concatenate([lut, np.fromiter(map(get, new), np.uint32, count=len(new))])
                self.luts[who] = lut
            yield lut[ids], b - a

    def _run(self, jobs):
        if self.workers <= 1 or len(jobs) < 4:
            for job in jobs:
                yield ("inline", *self.inline(*job))
            return
        if self.pool is None:
            import concurrent.futures
            import multiprocessing

            # fork: workers need no re-import of __main__ and only run _worker_task (str and
            # numpy); other platforms stay serial (see `workers` in prepare_corpus)
            self.pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("fork"),
                initializer=_worker_init)
        pending = []
        for job in jobs:
            pending.append(self.pool.submit(_worker_task, *job))
            if len(pending) > 2 * self.workers:  # bounded: a few blocks in flight
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        self.pool = None

    def itos(self) -> list[str]:
        return list(self.table)


class CharEncoder:
    """Every character is a symbol; the newline is `<eos>`. A dense code point table."""

    UNSET = np.uint32(0xFFFFFFFF)

    def __init__(self):
        self.lut = np.full(0x110000, self.UNSET, np.uint32)
        self.syms: list[str] = []
        self.frozen = False
        self.oov = None

    def freeze(self) -> None:
        self.frozen = True
        self.oov = len(self.syms)
        self.lut[self.lut == self.UNSET] = self.oov

    def blocks(self, src: Source):
        for block in text_blocks(src):
            cps = np.frombuffer(block.encode("utf-32-le"), np.uint32)
            ids = self.lut[cps]
            if not self.frozen:
                miss = ids == self.UNSET
                if miss.any():
                    uniq, first = np.unique(cps[miss], return_index=True)
                    for cp in uniq[np.argsort(first)]:
                        self.lut[cp] = len(self.syms)
                        self.syms.append(EOS if cp == 10 else chr(cp))
                    ids = self.lut[cps]
            yield ids, len(block)

    def itos(self) -> list[str]:
        return list(self.syms)

    def close(self) -> None:
        pass


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                disable=None, leave=False)


def _pass_a(encoder, src: Source, split: str, raw_path: Path, count: bool):
    """Provisional ids of one split into raw_path; (tokens, per-id counts if `count`, oov)."""
    counts = _Counts() if count else None
    n = oov = 0
    with open(raw_path, "wb") as f, _progress(source_size(src), f"tokenize {split}") as bar:
        for ids, nbytes in encoder.blocks(src):
            f.write(ids.tobytes())  # not tofile: its failed write has no errno (a full disk)
            if counts is not None:
                counts.add(ids)
            if encoder.oov is not None:
                oov += int(np.count_nonzero(ids == encoder.oov))
            n += len(ids)
            bar.update(nbytes)
    return n, counts, oov


# ----------------------------------------------------------------------------- vocabulary


def final_vocab(prov_itos: list[str], train_counts: np.ndarray, oov_elsewhere: bool,
                max_vocab: int, min_freq: int) -> tuple[list[str], np.ndarray, str | None]:
    """Provisional ids -> final vocabulary (first-appearance order kept) and a lookup table
    of len(prov_itos) + 1 entries (the last is the oov id). Returns (itos, lut, unk)."""
    v = len(prov_itos)
    index = {s: i for i, s in enumerate(prov_itos)}
    forced = [index[s] for s in (EOS, UNK) if s in index]
    keep = np.ones(v, bool) if min_freq <= 0 else train_counts >= min_freq
    keep[forced] = False  # handled separately
    order = np.lexsort((np.arange(v), -train_counts))  # most frequent first, ties by appearance
    cands = order[keep[order]]
    cap = max_vocab if max_vocab > 0 else v + 1
    drops = len(cands) < v - len(forced) or len(cands) > cap - len(forced)
    add_unk = UNK not in index and (drops or oov_elsewhere)
    room = cap - len(forced) - int(add_unk)
    if room < 0 or (max_vocab > 0 and room == 0 and len(cands)):
        raise UserError(f"--max_vocab {max_vocab} leaves no room for words next to "
                        f"{EOS}/{UNK}; raise it.")
    kept = np.zeros(v, bool)
    kept[cands[:room]] = True
    kept[forced] = True
    kept_ids = np.flatnonzero(kept)
    itos = [prov_itos[i] for i in kept_ids]
    if add_unk:
        itos.append(UNK)
    unk = UNK if (add_unk or UNK in index) else None
    unk_final = itos.index(UNK) if unk else 0
    lut = np.full(v + 1, unk_final, np.uint32)
    lut[kept_ids] = np.arange(len(kept_ids), dtype=np.uint32)
    return itos, lut, unk


# ----------------------------------------------------------------------------- output dir


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and ((out / MANIFEST).is_file() or not any(out.iterdir()))):
        raise UserError(f"--out {out} exists and is not a prepared corpus; choose another "
                        f"directory or remove it.")


def _remove_stale_partials(out: Path) -> None:
    """Leftovers of a prepare that was killed (SIGKILL, power loss): their process is gone."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        try:
            os.kill(int(p.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            pass  # not ours, or another user's live process


def _swap_in(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- prepare


def prepare_corpus(corpus: str, out: str | os.PathLike | None = None, data_dir=None,
                   tokenizer: str | None = None, chunk_len: int = 65536,
                   shard_tokens: int = 16_777_216, max_vocab: int = 0, min_freq: int = 0,
                   bpe_vocab: int = 16384, download: bool = True, mirror: str | None = None,
                   workers: int = 0, quiet: bool = False) -> Path:
    """Prepare CORPUS into OUT (default shards/CORPUS); returns the output directory.

    workers: processes that split text into words (0: one per CPU, at most 4); the output
    is identical for any number."""
    corpus = str(corpus)
    for name, value, low in (("chunk_len", chunk_len, 1), ("shard_tokens", shard_tokens, 1),
                             ("max_vocab", max_vocab, 0), ("min_freq", min_freq, 0),
                             ("bpe_vocab", bpe_vocab, 1)):
        if not isinstance(value, int) or value < low:
            raise UserError(f"--{name} must be an integer >= {low}, got {value!r}.")
    if tokenizer is not None and tokenizer not in KINDS:
        raise UserError(f"--tokenizer {tokenizer!r} is unknown; use one of {', '.join(KINDS)}.")
    out = Path(out) if out else default_dir(corpus)
    _check_out(out)
    c = resolve_corpus(corpus, data_dir=data_dir, download=download, mirror=mirror)
    kind = tokenizer or c.tokenizer
    if (max_vocab or min_freq) and kind not in ("word", "char"):
        raise UserError(f"--max_vocab/--min_freq apply to the word and char tokenizers, not {kind}.")
    for split, src in c.sources.items():
        if source_size(src) == 0:
            raise UserError(f"{src.describe()} is empty: the {split} split has no tokens; "
                            f"put the {split} text there.")

    made_parent = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if workers <= 0:
            workers = min(4, os.cpu_count() or 1)
        if sys.platform != "linux":
            workers = 1  # the worker pool uses fork
        manifest = _build(c, kind, tmp, chunk_len, shard_tokens, max_vocab, min_freq, bpe_vocab,
                          workers)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_parent:
            try:
                out.parent.rmdir()
            except OSError:
                pass
        raise
    if not quiet:
        for split, s in manifest["splits"].items():
            unk = f", {s['unk']:,} {UNK}" if s.get("unk") is not None else ""
            oov = ""
            if split != "train" and s.get("oov") is not None:
                oov = f", {s['oov'] / s['tokens']:.2%} not in the train vocabulary"
            print(f"{split}: {s['tokens']:,} tokens{unk}{oov}, {len(s['shards'])} shard(s)")
        print(f"{out}: {manifest['corpus']}, {kind} tokenizer, vocab {manifest['vocab_size']:,}, "
              f"{manifest['dtype']}")
    warning = oov_warning(manifest)
    if warning:
        print(f"dist-lm: warning: {warning}", file=sys.stderr)
    return out


OOV_WARN = 0.01  # share of valid/test tokens outside the train vocabulary that is worth a word


def oov_warning(manifest: dict) -> str | None:
    """One line when valid/test have many words train lacks while train has no <unk>: those
    words all become an <unk> the model never saw in training (word tokenizer only)."""
    splits = manifest["splits"]
    if manifest["tokenizer"] != "word" or splits["train"].get("unk"):
        return None
    high = [(s, splits[s]["oov"] / splits[s]["tokens"]) for s in ("valid", "test")
            if splits[s].get("oov") and splits[s]["oov"] / splits[s]["tokens"] > OOV_WARN]
    if not high:
        return None
    rates = " and ".join(f"{rate:.1%} of the {s}" for s, rate in high)
    return (f"{rates} tokens are not in the train vocabulary ({manifest['vocab_size']:,} symbols); "
            f"they become {UNK}, which train never has, so the model cannot learn to predict it "
            f"and perplexities are not comparable. Prepare again with --max_vocab N (below "
            f"{manifest['vocab_size']:,}) or --min_freq 2 so that rare train words become {UNK} too.")


def _build(c: Corpus, kind: str, tmp: Path, chunk_len: int, shard_tokens: int,
           max_vocab: int, min_freq: int, bpe_vocab: int, workers: int) -> dict:
    chunks_per_shard = max(1, shard_tokens // chunk_len)
    splits: dict[str, dict] = {}

    def writer(split, dtype):
        return SplitWriter(tmp, split, dtype, chunk_len, chunks_per_shard)

    if kind in ("byte", "bpe"):
        if kind == "byte":
            tok = ByteTokenizer()
        else:
            tok = train_bpe(text_lines(c.sources["train"]), bpe_vocab)
        dtype = dtype_for(tok.vocab_size)
        for split in SPLITS:
            blocks = (_byte_blocks(c.sources[split]) if kind == "byte"
                      else _bpe_blocks(tok, c.sources[split]))
            splits[split] = {**_write_split(writer(split, dtype), blocks), "unk": None, "oov": None}
    else:
        spaced = kind == "word" or c.char_split == "whitespace"
        enc = WordEncoder(workers) if spaced else CharEncoder()
        filtering = bool(max_vocab or min_freq)
        counts, sizes, oovs = {}, {}, {}
        try:
            for split in SPLITS:
                if split == "valid":
                    enc.freeze()  # valid/test are encoded with the train vocabulary
                sizes[split], counts[split], oovs[split] = _pass_a(
                    enc, c.sources[split], split, tmp / f"{split}.ids", filtering and split == "train")
                if sizes[split] == 0:
                    raise UserError(f"{c.sources[split].describe()} has no tokens; the {split} "
                                    f"split must not be empty.")
        finally:
            enc.close()
        prov = enc.itos()
        v = len(prov)
        train_counts = counts["train"].upto(v) if filtering else np.zeros(v, np.int64)
        itos, lut, unk = final_vocab(prov, train_counts, any(oovs.values()), max_vocab, min_freq)
        if kind == "word":
            tok = WordTokenizer(itos, unk=unk)
        else:
            tok = CharTokenizer(itos, unk=unk, split=c.char_split)
        dtype = dtype_for(tok.vocab_size)
        for split in SPLITS:
            raw = tmp / f"{split}.ids"
            unk_count = [0]

            def remap(raw=raw, unk_count=unk_count):
                for block in _raw_blocks(raw):
                    ids = lut[block]
                    if tok.unk_id is not None:
                        unk_count[0] += int(np.count_nonzero(ids == tok.unk_id))
                    yield ids

            entry = _write_split(writer(split, dtype), remap())
            raw.unlink()
            # oov: tokens outside the train vocabulary (before max_vocab/min_freq); train: 0
            splits[split] = {**entry, "unk": unk_count[0], "oov": oovs[split]}
    tok.save(tmp / "vocab.json")
    return {"format": FORMAT, "corpus": c.name, "tokenizer": kind, "vocab_size": tok.vocab_size,
            "dtype": dtype, "chunk_len": chunk_len,
            "sources": {s: _describe_source(src) for s, src in c.sources.items()},
            "splits": splits}


def _write_split(w: SplitWriter, blocks) -> dict:
    try:
        for ids in blocks:
            w.write(ids)
    except BaseException:
        w.abort()
        raise
    return w.close()


def _describe_source(src: Source) -> dict:
    d = {"file": src.path.name}
    if src.start or src.end is not None:
        d["bytes"] = [src.start, src.end]
    return d


def _raw_blocks(path: Path):
    with open(path, "rb") as f:
        while True:
            block = np.fromfile(f, np.uint32, BLOCK_IDS)
            if not len(block):
                return
            yield block


def _byte_blocks(src: Source):
    with io.BufferedReader(_RangeRaw(src), 1 << 20) as f:
        while block := f.read(BLOCK_CHARS):
            yield np.frombuffer(block, np.uint8)


def _bpe_blocks(tok, src: Source, lines_per_batch: int = 8192):
    lines = text_lines(src)
    while batch := list(itertools.islice(lines, lines_per_batch)):
        yield np.fromiter(itertools.chain.from_iterable(tok.encode_lines(batch)), np.uint32)
