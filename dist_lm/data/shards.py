"""WebDataset tar shards of a prepared corpus: writing, indexing, reading, verifying.

Format (also in shards/README.md): each split is cut into chunks of `chunk_len` tokens (the
last one may be short: valid/test must see every token). Chunk k is one WebDataset sample
with key "%010d" % k and two members, in this order:

    <key>.pos.txt      decimal offset of the chunk's first token in the split's stream
    <key>.tokens.npy   1-D array (numpy .npy, manifest dtype) of the chunk's tokens

`shard_tokens // chunk_len` chunks go into each `<split>-%06d.tar`. Tar members have
mtime 0, mode 0444, uid/gid 0, user/group "bigdata" (webdataset's TarWriter defaults),
USTAR format, so preparing twice gives byte-identical files; manifest.json records each
shard's chunk count, token count and sha256.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fileio import read_json

MANIFEST = "manifest.json"
FORMAT = 1
DTYPES = ("uint16", "uint32")
NPY = ".tokens.npy"
POS = ".pos.txt"
REFIX = "re-run `dist-lm prepare` for this corpus (or re-copy the file)"


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


class _HashingFile:
    """A write-only file that hashes what passes through (tarfile's stream mode only writes)."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")
        self.h = hashlib.sha256()

    def write(self, b) -> int:
        self.h.update(b)
        return self.f.write(b)

    def close(self) -> None:
        self.f.close()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


class SplitWriter:
    """Accepts a split's token ids in pieces; writes full chunks into rolling tar shards."""

    def __init__(self, out_dir: Path, split: str, dtype: str, chunk_len: int, chunks_per_shard: int):
        self.out_dir, self.split, self.dtype = Path(out_dir), split, np.dtype(dtype)
        self.chunk_len, self.chunks_per_shard = chunk_len, max(1, chunks_per_shard)
        self.pending = np.empty(chunk_len, self.dtype)
        self.n_pending = 0
        self.tokens = 0  # tokens written into chunks so far
        self.chunks = 0
        self.shards: list[dict] = []
        self._tar = None

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        pos = 0
        if self.n_pending:
            take = min(self.chunk_len - self.n_pending, len(ids))
            self.pending[self.n_pending:self.n_pending + take] = ids[:take]
            self.n_pending += take
            pos = take
            if self.n_pending == self.chunk_len:
                self._emit(self.pending)
                self.n_pending = 0
        while len(ids) - pos >= self.chunk_len:
            self._emit(ids[pos:pos + self.chunk_len].astype(self.dtype, copy=False))
            pos += self.chunk_len
        rest = len(ids) - pos
        if rest:
            self.pending[:rest] = ids[pos:]
            self.n_pending = rest

    def _emit(self, chunk: np.ndarray) -> None:
        import webdataset as wds

        if self._tar is None:
            name = shard_name(self.split, len(self.shards))
            self._file = _HashingFile(self.out_dir / name)
            self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)
            # webdataset 1.0.2 computes format=USTAR but never passes it to tarfile, which
            # then writes PAX headers (one per member for a float mtime): set it here.
            self._tar.tarstream.format = tarfile.USTAR_FORMAT
            self.shards.append({"name": name, "chunks": 0, "tokens": 0, "sha256": None})
        key = "%010d" % self.chunks
        self._tar.write({"__key__": key, "pos.txt": str(self.tokens).encode(),
                         "tokens.npy": npy_bytes(chunk)})
        self.chunks += 1
        self.tokens += len(chunk)
        entry = self.shards[-1]
        entry["chunks"] += 1
        entry["tokens"] += len(chunk)
        if entry["chunks"] == self.chunks_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self.shards[-1]["sha256"] = self._file.h.hexdigest()
            self._tar = None

    def close(self) -> dict:
        """Flush the short last chunk; return the manifest entry of the split."""
        if self.n_pending:
            self._emit(self.pending[:self.n_pending].copy())
            self.n_pending = 0
        self._close_shard()
        return {"tokens": self.tokens, "chunks": self.chunks, "shards": self.shards}

    def abort(self) -> None:
        if self._tar is not None:
            try:
                self._tar.close()
            except Exception:
                pass
            self._file.close()
            self._tar = None


# ----------------------------------------------------------------------------- manifest


def read_manifest(directory: str | os.PathLike) -> dict:
    """manifest.json of a prepared corpus, checked for internal consistency."""
    d = Path(directory)
    p = d / MANIFEST
    if not p.is_file():
        raise UserError(f"{p} not found: {d} is not a prepared corpus; run "
                        f"`dist-lm prepare CORPUS --out {d}` first.")
    m = read_json(p, REFIX)
    try:
        if m["format"] != FORMAT:
            raise UserError(f"{p} has format {m['format']}; this dist-lm reads format {FORMAT}; "
                            f"re-run `dist-lm prepare`.")
        if m["dtype"] not in DTYPES or int(m["chunk_len"]) < 1:
            raise UserError(f"{p}: dtype {m['dtype']!r} / chunk_len {m['chunk_len']!r} invalid; {REFIX}.")
        for split, s in m["splits"].items():
            shards = s["shards"]
            if sum(x["tokens"] for x in shards) != s["tokens"] or \
                    sum(x["chunks"] for x in shards) != s["chunks"]:
                raise UserError(f"{p}: split '{split}' token/chunk totals do not match its shard "
                                f"list; {REFIX}.")
            for x in shards:
                x["name"], x["sha256"]  # noqa: B018 (presence check)
    except (KeyError, TypeError) as exc:
        raise UserError(f"{p} is missing {exc}; {REFIX}.") from None
    return m


def split_info(manifest: dict, split: str, where: str) -> dict:
    s = manifest["splits"].get(split)
    if s is None:
        raise UserError(f"{where}/{MANIFEST} has no split '{split}' (it has "
                        f"{', '.join(manifest['splits'])}); pick one of those.")
    return s


# ----------------------------------------------------------------------------- tar index


def _check_shard_file(path: Path, entry: dict, check_sha256: bool = True) -> None:
    """The shard exists and (unless told not to check) its sha256 is the manifest's."""
    if not path.is_file():
        raise UserError(f"shard {path} is missing; {REFIX}.")
    if check_sha256:
        got = sha256_file(path)
        if got != entry["sha256"]:
            raise UserError(f"shard {path} is corrupt: sha256 {got} does not match the manifest's "
                            f"{entry['sha256']}; {REFIX}.")


def _check_counts(path: Path, entry: dict, chunks: int, tokens: int) -> None:
    if (chunks, tokens) != (entry["chunks"], entry["tokens"]):
        raise UserError(f"shard {path} holds {chunks} chunks / {tokens} tokens, the manifest "
                        f"says {entry['chunks']} / {entry['tokens']}; {REFIX}.")


def _tar_members(f, path: Path):
    """(name, data_offset, size) of each member, from the 512-byte USTAR headers."""
    size_total = os.fstat(f.fileno()).st_size
    off = 0
    while True:
        f.seek(off)
        hdr = f.read(512)
        if len(hdr) < 512:
            raise UserError(f"shard {path} is truncated (no end-of-archive marker); {REFIX}.")
        if hdr == b"\0" * 512:
            return
        try:
            name = hdr[:100].split(b"\0", 1)[0].decode()
            size = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            stored = int(hdr[148:156].split(b"\0", 1)[0].strip(), 8)
        except ValueError:
            raise UserError(f"shard {path} has a corrupt tar header at byte {off}; {REFIX}.") from None
        if sum(hdr[:148]) + 8 * 32 + sum(hdr[156:]) != stored:
            raise UserError(f"shard {path} has a corrupt tar header at byte {off} (checksum); {REFIX}.")
        data = off + 512
        if data + size > size_total:
            raise UserError(f"shard {path} is truncated in member {name}; {REFIX}.")
        yield name, data, size
        off = data + (size + 511) // 512 * 512


def _npy_header(f, data_off: int, size: int, path: Path, name: str):
    f.seek(data_off)
    head = io.BytesIO(f.read(min(size, 4096)))
    try:
        version = np.lib.format.read_magic(head)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(head)
    except (ValueError, OSError, SyntaxError) as exc:
        raise UserError(f"shard {path}: member {name} is not a .npy array ({exc}); {REFIX}.") from None
    if len(shape) != 1 or head.tell() + shape[0] * dtype.itemsize != size:
        raise UserError(f"shard {path}: member {name} has shape {shape} that does not fill it; {REFIX}.")
    return data_off + head.tell(), shape[0], dtype


def shard_index(path: Path, entry: dict, dtype: str, first_chunk: int, check_sha256: bool = True) -> np.ndarray:
    """Per chunk (file offset of its tokens, token count); checked against the manifest."""
    _check_shard_file(path, entry, check_sha256)
    rows = []
    with open(path, "rb") as f:
        for name, off, size in _tar_members(f, path):
            if not name.endswith(NPY):
                continue
            key = name[:-len(NPY)]
            want = "%010d" % (first_chunk + len(rows))
            if key != want:
                raise UserError(f"shard {path}: sample {key} found where {want} was expected; "
                                f"the shard does not match the manifest; {REFIX}.")
            data_off, n, dt = _npy_header(f, off, size, path, name)
            if dt != np.dtype(dtype):
                raise UserError(f"shard {path}: {name} is {dt}, the manifest says {dtype}; {REFIX}.")
            rows.append((data_off, n))
    idx = np.array(rows, dtype=np.int64).reshape(-1, 2)
    _check_counts(path, entry, len(idx), int(idx[:, 1].sum()))
    return idx


# ----------------------------------------------------------------------------- verify


def verify_corpus(directory: str | os.PathLike, quiet: bool = False) -> dict:
    """Check vocab.json and every shard (sha256, tar structure, keys, positions, counts)."""
    from .tokenizers import load_tokenizer

    d = Path(directory)
    m = read_manifest(d)
    tok = load_tokenizer(d / "vocab.json")
    if tok.vocab_size != m["vocab_size"]:
        raise UserError(f"{d}/vocab.json has {tok.vocab_size} symbols, the manifest says "
                        f"{m['vocab_size']}; {REFIX}.")
    listed = set()
    for split, s in m["splits"].items():
        chunk = 0
        for entry in s["shards"]:
            path = d / entry["name"]
            listed.add(entry["name"])
            _check_shard_file(path, entry)
            tokens = chunks = 0
            try:
                with tarfile.open(path, "r:") as tf:
                    names = tf.getnames()
                    for i in range(0, len(names), 2):
                        key = "%010d" % chunk
                        if names[i:i + 2] != [key + POS, key + NPY]:
                            raise UserError(f"shard {path}: members {names[i:i + 2]} where sample "
                                            f"{key} was expected; {REFIX}.")
                        pos = int(tf.extractfile(names[i]).read())
                        arr = np.load(io.BytesIO(tf.extractfile(names[i + 1]).read()), allow_pickle=False)
                        if pos != chunk * m["chunk_len"] or arr.dtype != np.dtype(m["dtype"]) or arr.ndim != 1:
                            raise UserError(f"shard {path}: sample {key} has position {pos} / dtype "
                                            f"{arr.dtype}, not what the manifest says; {REFIX}.")
                        if arr.size and int(arr.max()) >= m["vocab_size"]:
                            raise UserError(f"shard {path}: sample {key} has token id {int(arr.max())} "
                                            f">= vocab size {m['vocab_size']}; {REFIX}.")
                        tokens += arr.size
                        chunks += 1
                        chunk += 1
            except (tarfile.TarError, ValueError, OSError, EOFError) as exc:
                raise UserError(f"shard {path} cannot be read ({exc}); {REFIX}.") from None
            _check_counts(path, entry, chunks, tokens)
        if not quiet:
            print(f"{split}: {len(s['shards'])} shard(s), {s['chunks']} chunks, {s['tokens']} tokens: ok")
    extra = sorted(p.name for p in d.glob("*.tar") if p.name not in listed)
    if extra:
        raise UserError(f"{d} holds shards the manifest does not list ({', '.join(extra[:3])}); "
                        f"{REFIX} into an empty directory.")
    if not quiet:
        print(f"{d}: {m['corpus']}, {m['tokenizer']} tokenizer, vocab {m['vocab_size']}: all shards verified",
              file=sys.stdout)
    return m
