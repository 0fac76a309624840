"""StreamLoader: AWD-LSTM's batchify/get_batch windows, rank splitting, resume, URLs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helpers.corpus import batchify, corrupt_copy, read_split, reference_ids, reference_windows
from dist_lm.data.prepare import prepare_corpus
from dist_lm.data.streams import StreamLoader, _Layout, _LocalReader
from dist_lm.errors import UserError


@pytest.fixture(scope="module")
def ptb(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("streams") / "ptb"
    prepare_corpus("ptb", out=out, data_dir=shared_data, quiet=True)
    return out


@pytest.fixture(scope="module")
def ptb_train_ref(shared_data):
    _, (train,) = reference_ids([shared_data / "ptb" / "ptb.train.txt"])
    return torch.tensor(train)


@pytest.fixture(scope="module")
def small(tmp_path_factory, shared_data):
    """PTB valid as a text corpus with tiny chunks (100) and shards (10 chunks): windows
    cross chunk and shard boundaries all the time."""
    root = tmp_path_factory.mktemp("small")
    for split in ("train", "valid", "test"):
        shutil.copy(shared_data / "ptb" / "ptb.valid.txt", root / f"{split}.txt")
    out = root / "shards"
    prepare_corpus(f"text:{root}", out=out, chunk_len=100, shard_tokens=1000, quiet=True)
    return out


def _windows(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _assert_same(got, want):
    assert len(got) == len(want)
    for (x, y), (rx, ry) in zip(got, want):
        assert x.dtype == torch.int64 and x.shape == rx.shape
        assert torch.equal(x, rx) and torch.equal(y, ry)


@pytest.mark.parametrize("variable", [False, True])
def test_w1_equals_reference_batchify_on_ptb(ptb, ptb_train_ref, variable):
    B, bptt = 80, 70
    ref = list(reference_windows(batchify(ptb_train_ref, B), bptt, variable, seed=141))
    loader = StreamLoader(ptb, "train", B, bptt=bptt, variable_bptt=variable, seed=141)
    assert loader.stream_len == len(ptb_train_ref) // B
    _assert_same(_windows(loader), ref)
    assert loader.epoch == 1


def test_second_epoch_continues_the_generator_and_max_seq_len(ptb, ptb_train_ref):
    B = 10
    ref = list(reference_windows(batchify(ptb_train_ref, B), 70, True, seed=5, max_seq_len=72, epochs=2))
    loader = StreamLoader(ptb, "train", B, bptt=70, variable_bptt=True, seed=5, max_seq_len=72)
    got = _windows(loader) + _windows(loader)
    _assert_same(got, ref)
    assert max(x.shape[0] for x, _ in got) <= 72
    assert loader.epoch == 2


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_the_global_batch(ptb, world):
    B = 16
    glob = _windows(StreamLoader(ptb, "train", B, bptt=35, variable_bptt=True, seed=1))
    per_rank = [_windows(StreamLoader(ptb, "train", B, rank=r, world_size=world, bptt=35,
                                      variable_bptt=True, seed=1)) for r in range(world)]
    assert {len(w) for w in per_rank} == {len(glob)}  # same step count on every rank
    b = B // world
    for k, (gx, gy) in enumerate(glob):
        xs = [w[k][0] for w in per_rank]
        assert all(x.shape == (gx.shape[0], b) for x in xs)
        assert torch.equal(torch.cat(xs, 1), gx)
        assert torch.equal(torch.cat([w[k][1] for w in per_rank], 1), gy)
    # disjoint: each rank's first window holds its own streams' starting tokens
    stream = torch.tensor(read_split(ptb, "train").astype(np.int64))
    L = len(stream) // B
    for r, w in enumerate(per_rank):
        starts = [int(r * b + j) * L for j in range(b)]
        assert torch.equal(w[0][0][0], stream[starts])


def test_resume_mid_epoch_gives_the_same_next_windows(ptb, tmp_path):
    kw = dict(bptt=40, variable_bptt=True, seed=7, rank=1, world_size=2)
    full = StreamLoader(ptb, "train", 8, **kw)
    it = iter(full)
    for _ in range(13):
        next(it)
    sd = full.state_dict()
    torch.save(sd, tmp_path / "s.pt")
    rest = [(x.clone(), y.clone()) for x, y in it] + _windows(full)  # rest of epoch 0 + epoch 1
    resumed = StreamLoader(ptb, "train", 8, **{**kw, "seed": 999})  # seed comes from the state
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert resumed.epoch == 0 and resumed.position == sd["position"] > 0
    got = _windows(resumed) + _windows(resumed)
    _assert_same(got, rest)


def test_resume_at_epoch_end_and_fixed_bptt(ptb):
    a = StreamLoader(ptb, "valid", 10, bptt=70)
    ws = _windows(a)
    assert sum(x.shape[0] for x, _ in ws) == a.stream_len - 1  # fixed bptt covers every target
    it = iter(a)
    for _ in range(len(ws)):
        next(it)  # suspended right after the last window of epoch 1
    b = StreamLoader(ptb, "valid", 10, bptt=70)
    b.load_state_dict(a.state_dict())
    assert b.epoch == 1
    assert _windows(b) == [] and b.epoch == 2  # the rest of epoch 1 is empty
    _assert_same(_windows(b), ws)


def test_small_chunks_small_buffer_and_pipe_urls(small):
    ref_stream = torch.tensor(read_split(small, "train").astype(np.int64))
    ref = list(reference_windows(batchify(ref_stream, 6), 30, True, seed=2))
    big = StreamLoader(small, "train", 6, bptt=30, variable_bptt=True, seed=2)
    _assert_same(_windows(big), ref)
    # a buffer of 8 rows per stream: refills nearly every window, windows longer than it
    tiny = StreamLoader(small, "train", 6, bptt=30, variable_bptt=True, seed=2, buffer_tokens=48)
    _assert_same(_windows(tiny), ref)
    piped = StreamLoader(small, "train", 6, rank=1, world_size=2, bptt=30, variable_bptt=True,
                         seed=2, shard_url=f"pipe:cat {small}/{{name}}", buffer_tokens=300)
    _assert_same(_windows(piped), [(x[:, 3:], y[:, 3:]) for x, y in ref])
    # resume in URL mode: readers reopen and skip to the position
    piped2 = StreamLoader(small, "train", 6, rank=1, world_size=2, bptt=30, variable_bptt=True,
                          seed=2, shard_url=f"pipe:cat {small}/{{name}}")
    it = iter(piped2)
    for _ in range(5):
        next(it)
    again = StreamLoader(small, "train", 6, rank=1, world_size=2, bptt=30, variable_bptt=True,
                         seed=0, shard_url=f"pipe:cat {small}/{{name}}")
    again.load_state_dict(piped2.state_dict())
    _assert_same(_windows(again), [(x[:, 3:], y[:, 3:]) for x, y in ref[5:]])


def test_pipe_readers_end_their_commands_when_the_loader_stops_mid_epoch(small):
    loader = StreamLoader(small, "train", 6, bptt=30, seed=2, shard_url=f"pipe:cat {small}/{{name}}",
                          buffer_tokens=60)
    it = iter(loader)
    first = tuple(t.clone() for t in next(it))
    pipes = [r.open_stream for r in loader._readers]
    assert all(p is not None and hasattr(p, "proc") for p in pipes)
    loader.close()  # mid-epoch: what the trainer does when it stops at max_steps
    assert all(p.stream.closed and p.proc.returncode is not None for p in pipes)
    # the loader reopens at its position on the next iteration
    ref = _windows(StreamLoader(small, "train", 6, bptt=30, seed=2))
    _assert_same([first] + _windows(loader), ref)


def test_bad_configurations_are_user_errors(ptb, small):
    with pytest.raises(UserError, match="not divisible by world size 3"):
        StreamLoader(ptb, "train", 8, world_size=3)
    with pytest.raises(UserError, match="shorter than one window"):
        StreamLoader(ptb, "test", 82430 // 50, bptt=70)
    with pytest.raises(UserError, match="no split 'dev'"):
        StreamLoader(ptb, "dev", 8)
    a = StreamLoader(ptb, "valid", 10)
    with pytest.raises(UserError, match="world_size"):
        StreamLoader(ptb, "valid", 10, rank=0, world_size=2).load_state_dict(a.state_dict())


def test_corrupt_shard_is_named_when_streaming(small, tmp_path):
    bad = corrupt_copy(small, tmp_path / "bad", "train-000003.tar", 2000)
    loader = StreamLoader(bad, "train", 2, bptt=30)
    with pytest.raises(UserError, match="train-000003.tar is corrupt: sha256"):
        _windows(loader)


def test_local_reader_closes_the_least_recently_used_shard(small):
    m = json.loads((small / "manifest.json").read_text())
    lay = _Layout(small, m, m["splits"]["train"])
    assert len(lay.shards) > 9
    reader = _LocalReader(lay, check_sha256=True, max_open=8)
    per_shard = 10 * 100  # chunks per shard x chunk_len of the `small` fixture
    want = read_split(small, "train")
    out = np.empty(3, lay.dtype)

    def read(s):
        reader.read(s * per_shard + 7, out)
        assert np.array_equal(out, want[s * per_shard + 7:s * per_shard + 10])

    for s in range(8):
        read(s)
    first, second = reader.files[0][0], reader.files[1][0]
    read(0)  # shard 0 is used again: shard 1 is now the least recently used
    read(8)
    assert list(reader.files) == [2, 3, 4, 5, 6, 7, 0, 8]
    assert second.closed and not first.closed
    read(0)
    read(7)
    assert reader.opens == 9  # nothing still open was opened twice
    reader.close()
    assert first.closed and not reader.files


@pytest.mark.parametrize("b, buffer_tokens", [(6, 48), (6, 1 << 22), (12, 120)])
def test_each_stream_opens_each_of_its_shards_once_per_epoch(small, b, buffer_tokens):
    """With more streams than 8 files the reader keeps 2 per stream open (b=12)."""
    loader = StreamLoader(small, "train", b, bptt=30, variable_bptt=True, seed=2,
                          buffer_tokens=buffer_tokens)
    it = iter(loader)
    next(it)
    reader = loader._readers
    for _ in it:
        pass
    shards = json.loads((small / "manifest.json").read_text())["splits"]["train"]["shards"]
    first_token = np.cumsum([0] + [s["tokens"] for s in shards])
    L = loader.stream_len

    def shard_of(t):
        return int(np.searchsorted(first_token, t, side="right")) - 1

    # stream j reads tokens j*L .. j*L+L-1; a shard two streams share may be opened by each
    needed = sum(shard_of(j * L + L - 1) - shard_of(j * L) + 1 for j in range(b))
    assert needed > 2 * b  # more shards than open files: eviction happens
    assert reader.opens <= needed
