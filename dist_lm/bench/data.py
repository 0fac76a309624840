"""`dist-lm bench data`: prepare throughput and StreamLoader read throughput.

    dist-lm bench data --json bench-data.json      # PTB and a 100M-token corpus (108 x PTB train)
    dist-lm bench data --quick                     # 2 and 4 x PTB train: a smoke run only

Every measurement runs in a fresh child process, so its peak RSS (ru_maxrss) is its own:
prepare's peak memory must not grow with the corpus (only the vocabulary), and neither may
the loader's. Baselines measured in the same run:
- prepare: AWD-LSTM's data.py tokenizer (a Python loop over lines, dict per word) on PTB.
- StreamLoader: iterating the same shards with webdataset's own pipeline (decode npy only).
Shared corpora come from $DIST_LM_SHARED_DATA, else ../shared/data beside the repo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import REPO, benchmark_corpora

_CHILD = r"""
import json, os, resource, sys, time
args = json.loads(sys.argv[1])

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def cpu_seconds():
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

out = {}
if args["what"] == "prepare":
    from dist_lm.data.prepare import prepare_corpus
    import webdataset  # imported by the shard writer; keep it out of the timing
    out["rss_start"] = rss_mib()
    t, c = time.perf_counter(), cpu_seconds()
    d = prepare_corpus(args["corpus"], out=args["out"], data_dir=args.get("data_dir"), quiet=True)
    out["seconds"] = time.perf_counter() - t
    out["cpu_seconds"] = cpu_seconds() - c  # this process and its tokenizer workers
    m = json.loads((d / "manifest.json").read_text())
    out["tokens"] = sum(s["tokens"] for s in m["splits"].values())
elif args["what"] == "reference_tokenize":
    out["rss_start"] = rss_mib()
    t = time.perf_counter()
    w2i, n = {}, 0
    for p in args["files"]:
        ids = []
        with open(p) as f:
            for line in f:
                for w in line.split() + ["<eos>"]:
                    if w not in w2i:
                        w2i[w] = len(w2i)
                    ids.append(w2i[w])
        n += len(ids)
    out["seconds"] = time.perf_counter() - t
    out["tokens"] = n
elif args["what"] == "loader":
    import torch
    from dist_lm.data.streams import StreamLoader
    out["rss_start"] = rss_mib()
    ld = StreamLoader(args["dir"], "train", args["batch"], rank=0, world_size=args["world"],
                      bptt=70, variable_bptt=True, seed=1, shard_url=args.get("url"))
    for key in ("first_epoch", "epoch"):  # the first one checks sha256 and reads tar headers
        t, n = time.perf_counter(), 0
        for x, y in ld:
            n += x.numel()
        out[key + "_seconds"] = time.perf_counter() - t
        out["tokens"] = n
elif args["what"] == "webdataset":
    import io, numpy as np, webdataset as wds
    out["rss_start"] = rss_mib()
    m = json.loads(open(os.path.join(args["dir"], "manifest.json")).read())
    urls = [os.path.join(args["dir"], s["name"]) for s in m["splits"]["train"]["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False)
    t, n = time.perf_counter(), 0
    for sample in ds:
        n += np.load(io.BytesIO(sample["tokens.npy"])).size
    out["epoch_seconds"] = time.perf_counter() - t
    out["tokens"] = n
out["peak"] = peak_mib()
out["children_peak"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(out))
"""


def _child(**args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True,
                         text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark child {args['what']} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _row(name, value, unit, baseline=None):
    r = {"name": name, "value": value, "unit": unit}
    if baseline:
        r["baseline"] = baseline
        r["ratio"] = value / baseline
    return r


def run(quick: bool = False) -> list[dict]:
    data = benchmark_corpora()
    copies = (2, 4) if quick else (10, 108)  # 108 x 929,589 = 100.4M train tokens
    rows = [_row("load average (1 min) at start, other processes", os.getloadavg()[0], "procs")]
    with tempfile.TemporaryDirectory(prefix="dist-lm-bench-data-") as tmp:
        tmp = Path(tmp)
        ptb_files = [str(data / "ptb" / f"ptb.{s}.txt") for s in ("train", "valid", "test")]
        ref = _child(what="reference_tokenize", files=ptb_files)
        ptb = _child(what="prepare", corpus="ptb", out=str(tmp / "ptb"), data_dir=str(data))
        ref_rate = ref["tokens"] / ref["seconds"]
        rows.append(_row("prepare ptb (word, end to end)", ptb["tokens"] / ptb["seconds"], "tok/s",
                         ref_rate))

        train = (data / "ptb" / "ptb.train.txt").read_bytes()
        big = tmp / "big"
        big.mkdir()
        for s in ("valid", "test"):
            (big / f"{s}.txt").write_bytes((data / "ptb" / f"ptb.{s}.txt").read_bytes())
        runs = {}
        for n in copies:  # the last is the 100M-token corpus; its shards are kept for the loader
            with open(big / "train.txt", "wb") as f:
                for _ in range(n):
                    f.write(train)
            runs[n] = _child(what="prepare", corpus=f"text:{big}", out=str(tmp / f"shards{n}"))
        (big / "train.txt").unlink()
        del train
        mid, bp = runs[copies[0]], runs[copies[-1]]
        label = f"{bp['tokens'] / 1e6:.0f}M tokens"
        mid_label = f"{mid['tokens'] / 1e6:.0f}M tokens"
        rows.append(_row(f"prepare {label} ({copies[-1]} x ptb train)", bp["tokens"] / bp["seconds"],
                         "tok/s", ref_rate))
        cpus = os.cpu_count() or 1
        rows.append(_row(f"prepare {label}: tok per CPU-second x {cpus} CPUs",
                         bp["tokens"] / bp["cpu_seconds"] * cpus, "tok/s"))
        rows.append(_row("prepare ptb: peak RSS", ptb["peak"], "MiB"))
        rows.append(_row(f"prepare {mid_label}: peak RSS", mid["peak"], "MiB"))
        rows.append(_row(f"prepare {label}: peak RSS", bp["peak"], "MiB", mid["peak"]))
        rows.append(_row(f"prepare {label}: peak RSS of a tokenizer worker", bp["children_peak"],
                         "MiB", mid["children_peak"]))

        shards = str(tmp / f"shards{copies[-1]}")
        wds_run = _child(what="webdataset", dir=shards)
        wds_rate = wds_run["tokens"] / wds_run["epoch_seconds"]
        small = _child(what="loader", dir=str(tmp / f"shards{copies[0]}"), batch=80, world=1)
        for world in (1, 4):
            r = _child(what="loader", dir=shards, batch=80, world=world)
            rate = r["tokens"] / r["epoch_seconds"]
            rows.append(_row(f"StreamLoader {label}, W={world} b={80 // world}, per process",
                             rate, "tok/s", wds_rate))
            if world == 1:
                rows.append(_row(f"StreamLoader {label}, W=1, first epoch (sha256 + index)",
                                 r["tokens"] / r["first_epoch_seconds"], "tok/s", wds_rate))
                rows.append(_row(f"StreamLoader {label}: peak RSS", r["peak"], "MiB", small["peak"]))
                rows.append(_row(f"StreamLoader {mid_label}: peak RSS", small["peak"], "MiB"))
        piped = _child(what="loader", dir=shards, batch=80, world=4, url=f"pipe:cat {shards}/{{name}}")
        rows.append(_row(f"StreamLoader {label}, W=4, pipe:cat URLs", piped["tokens"] / piped["epoch_seconds"],
                         "tok/s", wds_rate))
    return rows
