"""StreamLoader: one rank's share of AWD-LSTM's batchified token streams, read from shards.

    loader = StreamLoader("shards/ptb", "train", batch_size=80, rank=r, world_size=W,
                          bptt=70, variable_bptt=True, seed=141)
    for inputs, targets in loader:      # int64 [T, b], b = 80 // W; targets = next tokens
        ...
    sd = loader.state_dict()            # resume at the exact next window

The split's N tokens are cut into B = batch_size contiguous streams of L = N // B tokens
(batchify: data[:L*B].view(B, L).t()); rank r owns streams r*b .. r*b+b-1. Windows start at
i = 0 and advance by seq_len, with seq_len drawn like AWD-LSTM's main.py from a numpy
Generator seeded with `seed` (the same on every rank, so every rank takes the same number
of steps), or fixed (`for i in range(0, L - 1, bptt)`, evaluation).

Reading, with bounded memory: tokens are read per stream in blocks of `buffer_tokens // b`
positions into one [K, b] int64 buffer (one host->device copy per block); windows are views
of it. Local shards are read at random offsets through a per-shard index of the tar headers
(built once per process, after checking the shard's sha256 against the manifest). Any other
WebDataset URL (`shard_url="pipe:aws s3 cp s3://bucket/ptb/{name} -"`) is read sequentially:
each stream opens its own reader at its first shard and skips to its start.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .shards import NPY, REFIX, read_manifest, shard_index, split_info

_INDEX_CACHE: dict[tuple, np.ndarray] = {}  # (path, size, mtime_ns) -> shard index


class _Layout:
    """Where chunk k of a split lives: shard number and first chunk of each shard."""

    def __init__(self, corpus_dir: Path, manifest: dict, info: dict):
        self.dir = corpus_dir
        self.dtype = np.dtype(manifest["dtype"])
        self.chunk_len = int(manifest["chunk_len"])
        self.shards = info["shards"]
        counts = [s["chunks"] for s in self.shards]
        self.first_chunk = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # every chunk but the split's last is full: chunk k starts at token k * chunk_len
        for s in self.shards[:-1]:
            if s["tokens"] != s["chunks"] * self.chunk_len:
                raise UserError(f"{corpus_dir}/manifest.json: shard {s['name']} has a short chunk "
                                f"before the end of the split; {REFIX}.")

    def shard_of(self, chunk: int) -> int:
        return int(np.searchsorted(self.first_chunk, chunk, side="right") - 1)


class _LocalReader:
    """Random access to a split stored as local tar files.

    At most `max_open` shard files stay open; the least recently used one is closed first.
    A refill reads the b streams in turn, each from one shard or two (a boundary), so
    StreamLoader keeps room for 2 * b: every shard is then opened once per epoch."""

    def __init__(self, layout: _Layout, check_sha256: bool, max_open: int = 8):
        self.lay = layout
        self.check = check_sha256
        self.max_open = max(1, max_open)
        self.files: OrderedDict[int, tuple] = OrderedDict()  # oldest use first
        self.opens = 0  # files opened so far (tests, benchmarks)

    def _shard(self, s: int):
        got = self.files.get(s)
        if got is not None:
            self.files.move_to_end(s)
        else:
            entry = self.lay.shards[s]
            path = self.lay.dir / entry["name"]
            try:
                st = path.stat()
            except FileNotFoundError:
                raise UserError(f"shard {path} is missing; {REFIX}.") from None
            key = (str(path.resolve()), st.st_size, st.st_mtime_ns, entry["sha256"])
            idx = _INDEX_CACHE.get(key)
            if idx is None:
                idx = shard_index(path, entry, str(self.lay.dtype), int(self.lay.first_chunk[s]),
                                  self.check)
                _INDEX_CACHE[key] = idx
            while len(self.files) >= self.max_open:
                _, old = self.files.popitem(last=False)  # the least recently used
                old[0].close()
            got = self.files[s] = (open(path, "rb"), idx)
            self.opens += 1
        return got

    def read(self, offset: int, out: np.ndarray) -> None:
        """out[:] = tokens [offset, offset + len(out)) of the split."""
        cl, item = self.lay.chunk_len, self.lay.dtype.itemsize
        done, n = 0, len(out)
        while done < n:
            pos = offset + done
            chunk = pos // cl
            s = self.lay.shard_of(chunk)
            f, idx = self._shard(s)
            data_off, length = idx[chunk - self.lay.first_chunk[s]]
            within = pos - chunk * cl
            take = min(n - done, int(length) - within)
            f.seek(int(data_off) + within * item)
            if f.readinto(out[done:done + take]) != take * item:
                raise UserError(f"shard {f.name} is truncated; {REFIX}.")
            done += take

    def close(self) -> None:
        for f, _ in self.files.values():
            f.close()
        self.files.clear()


def _close_early(stream) -> None:
    """Close a gopen stream that may not be at its end. A pipe: command is terminated (its
    output is no longer wanted); its exit status then is not an error, so it is not checked."""
    proc = getattr(stream, "proc", None)
    if proc is None:
        stream.close()
        return
    if proc.poll() is None:
        proc.terminate()
    stream.stream.close()
    proc.wait()


class _UrlStream:
    """Sequential reader of a split from WebDataset URLs, starting at a token offset."""

    def __init__(self, layout: _Layout, url_template: str, offset: int):
        self.lay, self.tpl = layout, url_template
        self.open_stream = None  # the shard being read (a file, or a pipe: URL's process)
        self.chunks = self._chunks(offset // layout.chunk_len)
        self.cur = np.zeros(0, layout.dtype)
        self.cur_start = offset // layout.chunk_len * layout.chunk_len

    def _chunks(self, first: int):
        from webdataset.gopen import gopen
        from webdataset.tariterators import tar_file_iterator

        s = self.lay.shard_of(first)
        want = first
        for entry in self.lay.shards[s:]:
            url = self.tpl.format(name=entry["name"])
            stream = None
            try:
                stream = self.open_stream = gopen(url, "rb")
                for member in tar_file_iterator(stream):
                    name = member["fname"]
                    if not name.endswith(NPY):
                        continue
                    k = int(name[:-len(NPY)])
                    if k < want:
                        continue  # before this stream's start: skip
                    if k != want:
                        raise UserError(f"{url}: sample {k} found where {want} was expected; {REFIX}.")
                    want += 1
                    yield np.lib.format.read_array(io.BytesIO(member["data"]), allow_pickle=False)
                stream.close()  # a pipe: command that failed says so here
                stream = None  # closed and waited for: nothing left for `finally`
            except UserError:
                raise
            except Exception as exc:  # tar errors, a failing pipe: command, ...
                raise UserError(f"cannot read shard {url} ({exc}); check the URL or {REFIX}.") from None
            finally:  # also when the reader is closed mid-shard (GeneratorExit at the yield)
                self.open_stream = None
                if stream is not None:
                    _close_early(stream)

    def close(self) -> None:
        """Stop reading: the open shard is closed and a pipe: command ended now, not at GC."""
        self.chunks.close()

    def read(self, offset: int, out: np.ndarray) -> None:
        done, n = 0, len(out)
        while done < n:
            pos = offset + done
            while pos >= self.cur_start + len(self.cur):
                self.cur_start += len(self.cur)
                try:
                    self.cur = next(self.chunks)
                except StopIteration:
                    raise UserError(f"shards for {self.tpl} end before token {pos}; {REFIX}.") from None
            if pos < self.cur_start:
                raise RuntimeError("sequential shard reader moved backwards")
            within = pos - self.cur_start
            take = min(n - done, len(self.cur) - within)
            out[done:done + take] = self.cur[within:within + take]
            done += take


class StreamLoader:
    """Windows (inputs [T, b], targets [T, b]) over this rank's b of the B global streams."""

    def __init__(self, corpus_dir, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 bptt: int = 70, variable_bptt: bool = False, seed: int = 0, max_seq_len: int = 0,
                 device="cpu", shard_url: str | None = None, buffer_tokens: int = 1 << 22,
                 check_sha256: bool = True):
        self.corpus_dir = Path(corpus_dir)
        self.split = split
        manifest = read_manifest(self.corpus_dir)
        info = split_info(manifest, split, str(self.corpus_dir))
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"batch_size {batch_size}, rank {rank}, world_size {world_size}: need "
                            f"batch_size >= 1 and 0 <= rank < world_size.")
        if batch_size % world_size:
            raise UserError(f"global batch {batch_size} is not divisible by world size {world_size}; "
                            f"set train.global_batch to a multiple of {world_size}.")
        if bptt < 1:
            raise UserError(f"bptt must be >= 1, got {bptt}.")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.b = batch_size // world_size
        self.bptt, self.variable_bptt, self.max_seq_len = int(bptt), bool(variable_bptt), int(max_seq_len)
        self.seed = seed
        self.device = torch.device(device)
        self.n_tokens = int(info["tokens"])
        self.stream_len = self.n_tokens // batch_size
        if self.stream_len - 1 < self.bptt:
            raise UserError(f"the {split} split of {self.corpus_dir} has {self.n_tokens} tokens: "
                            f"{batch_size} streams of {self.stream_len} tokens are shorter than one "
                            f"window of bptt={self.bptt} (+1 target); lower the batch size or bptt.")
        self.layout = _Layout(self.corpus_dir, manifest, info)
        self.shard_url = shard_url
        self.check_sha256 = check_sha256
        self.block = max(1, min(self.stream_len, buffer_tokens // self.b))
        self.epoch = 0
        self.position = 0
        self.rng = np.random.default_rng(seed)
        self._buf = self._host = None
        self._buf_start = 0
        self._buf_rows = 0
        self._readers = None

    # ------------------------------------------------------------------ windows

    def _draw(self, i: int) -> int:
        if self.variable_bptt:
            bptt = self.bptt if self.rng.random() < 0.95 else self.bptt / 2.0
            seq_len = max(5, int(self.rng.normal(bptt, 5)))
            if self.max_seq_len > 0:
                seq_len = min(seq_len, self.max_seq_len)
        else:
            seq_len = self.bptt
        return min(seq_len, self.stream_len - 1 - i)

    def __iter__(self):
        # AWD-LSTM: train `while i < L - 1 - 1`; evaluate `for i in range(0, L - 1, bptt)`
        end = self.stream_len - 2 if self.variable_bptt else self.stream_len - 1
        i = self.position
        while i < end:
            seq_len = self._draw(i)
            a = i - self._buf_start
            if self._buf is None or a < 0 or a + seq_len + 1 > self._buf_rows:
                self._refill(i, max(self.block, seq_len + 1))
                a = 0
            buf = self._buf
            self.position = i + seq_len  # state_dict() now points at the next window
            yield buf[a:a + seq_len], buf[a + 1:a + 1 + seq_len]  # views of a read-only block
            i += seq_len
        self.epoch += 1
        self.position = 0
        self._drop_readers()

    # ------------------------------------------------------------------ reading

    def _stream_offset(self, j: int) -> int:
        return (self.rank * self.b + j) * self.stream_len  # global stream index times L

    def _refill(self, i: int, n: int) -> None:
        """Buffer rows [i, i + n): keep the overlap with the old buffer, read only new rows,
        so every stream is read strictly forward (what a pipe: URL allows)."""
        n = min(n, self.stream_len - i)
        keep = 0
        if self._buf is not None and self._buf_start <= i:
            keep = max(0, min(n, self._buf_start + self._buf.shape[0] - i))
        if self._readers is None:
            self._open_readers(i + keep)
        stage = np.empty((self.b, n - keep), self.layout.dtype)
        for j in range(self.b):
            self._reader(j).read(self._stream_offset(j) + i + keep, stage[j])
        # numpy, not torch.empty, for the block: with torch's allocator RSS crept up by
        # hundreds of MB over repeated 30 MB blocks (glibc); numpy's stays flat (measured)
        host = np.empty((n, self.b), np.int64)
        np.copyto(host[keep:], stage.T)  # transpose + widen in one pass
        if keep:
            a = i - self._buf_start
            host[:keep] = self._host[a:a + keep]
        self._host = host  # a new block each time: windows handed out earlier stay valid
        buf = torch.from_numpy(host)
        self._buf = buf if self.device.type == "cpu" else buf.to(self.device)
        self._buf_start = i
        self._buf_rows = n

    def _open_readers(self, i: int) -> None:
        if self.shard_url is None:
            # 2 per stream (one at a shard boundary), within a modest file descriptor budget
            self._readers = _LocalReader(self.layout, self.check_sha256,
                                         max_open=min(256, max(8, 2 * self.b)))
        else:
            self._readers = [_UrlStream(self.layout, self.shard_url, self._stream_offset(j) + i)
                             for j in range(self.b)]

    def _reader(self, j: int):
        return self._readers if isinstance(self._readers, _LocalReader) else self._readers[j]

    def _drop_readers(self) -> None:
        if isinstance(self._readers, _LocalReader):
            self._readers.close()
        elif self._readers is not None:
            for reader in self._readers:
                reader.close()
        self._readers = None
        self._buf = self._host = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        st = self.rng.bit_generator.state
        rng = {"bit_generator": st["bit_generator"], "state": str(st["state"]["state"]),
               "inc": str(st["state"]["inc"]), "has_uint32": int(st["has_uint32"]),
               "uinteger": int(st["uinteger"])}
        return {"version": 1, "split": self.split, "batch_size": self.batch_size,
                "world_size": self.world_size, "stream_len": self.stream_len, "bptt": self.bptt,
                "variable_bptt": self.variable_bptt, "epoch": self.epoch,
                "position": self.position, "rng": rng}

    def load_state_dict(self, sd: dict) -> None:
        for k in ("split", "batch_size", "world_size", "stream_len"):
            if sd.get(k) != getattr(self, k):
                raise UserError(f"stream state was saved with {k}={sd.get(k)!r}, this run has "
                                f"{getattr(self, k)!r}; resume with the same corpus, global batch "
                                f"and world size.")
        r = sd["rng"]
        bit = getattr(np.random, r["bit_generator"])()
        bit.state = {"bit_generator": r["bit_generator"],
                     "state": {"state": int(r["state"]), "inc": int(r["inc"])},
                     "has_uint32": r["has_uint32"], "uinteger": r["uinteger"]}
        self.rng = np.random.Generator(bit)
        self.epoch = int(sd["epoch"])
        self.position = int(sd["position"])
        self._drop_readers()

    def check(self) -> None:
        """Verify this split's local shards now (sha256 against the manifest, tar structure), so
        that a damaged shard stops a run before it writes anything; the indexes built here are
        cached for the reads. Shards behind a shard_url are checked as they stream."""
        if self.shard_url is not None:
            return
        reader = _LocalReader(self.layout, self.check_sha256, max_open=1)
        try:
            for s in range(len(self.layout.shards)):
                reader._shard(s)
        finally:
            reader.close()

    def close(self) -> None:
        self._drop_readers()

    def __repr__(self) -> str:
        return (f"StreamLoader({str(self.corpus_dir)!r}, {self.split!r}, batch_size={self.batch_size}, "
                f"rank={self.rank}/{self.world_size}, L={self.stream_len}, bptt={self.bptt}"
                f"{' variable' if self.variable_bptt else ''})")
