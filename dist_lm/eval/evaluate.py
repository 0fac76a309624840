"""Evaluation: perplexity / bits per character of a run on a split.

The reference protocol is AWD-LSTM's (salesforce/awd-lstm-lm main.py `evaluate`): the split
is cut into B contiguous streams (10 for valid, 1 for test), read in fixed bptt windows with
the hidden state carried from window to window. The reference returns
`sum_w len(window) * mean_nll(window) / len(data_source)`; every window holds T*B tokens, so
that is `sum_nll / (B * L)`, i.e. the sum of NLL over every predicted token divided by the
number of predicted tokens -- but its `len(data_source)` counts L rows while only L-1 are
predicted, a 1/L bias. We report exactly `sum NLL / number of predicted tokens`.

    from dist_lm.eval.windows import evaluate_stream
    sum_nll, n_tokens = evaluate_stream(model, loader)    # all-reduced over ranks
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..config import (EVAL_KEYS, CacheOptions, DynamicOptions, EvalOptions, coerce,
                      read_options)
from ..data.prepared import PreparedCorpus
from ..fileio import write_text_atomic
from ..metrics.meter import ppl_or_bpc
from ..metrics.writer import wandb_init, wandb_mode
from ..distributed import all_reduce_sum
from ..errors import UserError
from ..run.layout import run_dir_of
from .cache import NeuralCache, mix_log_prob
from .dynamic import SEARCH_DECAYS, SEARCH_LRS, DynamicEvaluator
from .windows import _sum_over_windows, carried_outputs, eval_mode, evaluate_stream  # noqa: F401  (re-exported)


# ---------------------------------------------------------------------------------------
# Options, protocols and the `dist-lm eval` command


CACHE_THETAS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0)  # dot products: can be large
CACHE_LAMBDAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
PROTOCOLS = ("reference", "fast")
FAST_BATCH = 64  # streams of the fast protocol (drops < 64 tokens at the split's end)


def parse_options(options: dict[str, Any]) -> EvalOptions:
    """`--bptt / --cache[.KEY] / --dynamic[.KEY] ...` as EvalOptions (dist_lm.config's reading:
    an unknown key or a bad value is a UserError naming the option)."""
    table = {k.replace("-", "_"): v for k, v in options.items()}
    opts = EvalOptions()
    for group, cls in (("cache", CacheOptions), ("dynamic", DynamicOptions)):
        if group in table:  # --cache / --dynamic alone: on with the defaults (or off)
            on = coerce(group, table.pop(group), bool, EVAL_KEYS)
            setattr(opts, group, cls() if on else None)
    return read_options(EvalOptions, table, EVAL_KEYS, opts)


def corpus_dir_for(run, corpus: str | None = None) -> Path:
    """The prepared corpus of a run (its config's data.shards, or `corpus`), checked against
    the run's vocabulary: evaluating with another vocabulary would be silently wrong."""
    d = Path(corpus) if corpus else run.config.shards_dir()
    theirs = PreparedCorpus.open(d, run.config.data.corpus, fix="pass --corpus DIR").tokenizer
    if list(theirs.itos) != list(run.tokenizer.itos):
        raise UserError(f"vocabulary mismatch: {d}/vocab.json ({theirs.vocab_size} tokens) differs "
                        f"from the run's vocab.json ({run.tokenizer.vocab_size} tokens) in "
                        f"{run_dir_of(run.checkpoint)}; pass --corpus with the corpus the run "
                        f"was trained on.")
    return d


def make_loader(corpus_dir: Path, split: str, batch_size: int, bptt: int,
                device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1):
    """Fixed-bptt windows over B contiguous streams (the evaluation protocols)."""
    return PreparedCorpus(corpus_dir, device=device).loader(split, batch_size, bptt, rank=rank,
                                                            world=world_size)


class _Progress:
    """A loader with a tqdm bar of its predicted tokens on stderr, as training has: rank 0
    only, and only when stderr is a terminal (logs and pipes stay clean). Other attributes
    are the loader's."""

    def __init__(self, loader, desc: str):
        self._loader, self._desc = loader, desc

    def __getattr__(self, name: str):
        return getattr(self._loader, name)

    def __iter__(self):
        from tqdm import tqdm

        total = max(0, self._loader.stream_len - 1) * self._loader.b  # this rank's targets
        with tqdm(total=total, desc=self._desc, unit="tok", unit_scale=True, leave=False,
                  dynamic_ncols=True) as bar:
            for inputs, targets in self._loader:
                yield inputs, targets
                bar.update(targets.numel())


def with_progress(loader, desc: str):
    """`loader` behind a progress bar when rank 0 writes to a terminal, else `loader` itself."""
    from ..distributed import is_main

    return _Progress(loader, desc) if is_main() and sys.stderr.isatty() else loader


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol '{protocol}'; choose reference or fast.")


def default_batch(cfg, split: str, protocol: str) -> int:
    """The reference protocol's batch for the split (test_batch_size / eval_batch_size), or
    FAST_BATCH; `protocol` was checked by the caller (evaluate_run)."""
    if protocol == "fast":
        return FAST_BATCH
    return cfg.data.test_batch_size if split == cfg.data.test_split else cfg.data.eval_batch_size


@torch.no_grad()
def evaluate_cache(model: torch.nn.Module, loader, cache: CacheOptions,
                   reduce: bool = True) -> tuple[float, int]:
    """evaluate_stream with the neural cache mixed in (one cache per stream column)."""
    nc = NeuralCache(cache.window, cache.theta, cache.normalize)

    def window_nll(out, targets):
        p, seen = nc.step(out.output, targets)
        return -mix_log_prob(-out.nll, p, cache.lambdah, seen).sum()

    return _sum_over_windows(model, loader, window_nll, reduce)


@torch.no_grad()
def cache_search(model: torch.nn.Module, loader, window: int, normalize: bool = False,
                 thetas=CACHE_THETAS, lambdas=CACHE_LAMBDAS) -> list[dict]:
    """Mean NLL for every (theta, lambdah): the model runs once (in eval mode, the caller's
    mode restored after), the cache once per theta."""
    with eval_mode(model):
        blocks = [(out.output, t, -out.nll) for out, t in carried_outputs(model, loader)]
    n = sum(t.numel() for _, t, _ in blocks)
    table = []
    for theta in thetas:
        nc = NeuralCache(window, theta, normalize)
        stepped = [(nc.step(k, t), lv) for k, t, lv in blocks]
        for lam in lambdas:
            s = sum(float(mix_log_prob(lv, p, lam, seen).sum()) for (p, seen), lv in stepped)
            table.append({"theta": theta, "lambdah": lam, "nll": -s / n})
    return table


def evaluate_run(run, split: str = "test", protocol: str = "reference", batch_size: int = 0,
                 bptt: int = 0, corpus: str | None = None, cache: CacheOptions | None = None,
                 dynamic: DynamicOptions | None = None, log=print) -> dict:
    """Evaluate a loaded Run (dist_lm.run.inference.load_run) on a split; returns the result dict.

    Distributed (torchrun): every rank evaluates its own streams and the sums are all-reduced;
    the process group must already be initialized.
    """
    from ..distributed import get_rank, get_world_size

    check_protocol(protocol)  # every path, the dynamic one included, records it in the result
    cfg = run.config
    d = corpus_dir_for(run, corpus)
    device = next(run.model.parameters()).device
    rank, world = get_rank(), get_world_size()
    bptt = bptt or cfg.train.bptt
    kind = run.tokenizer.kind
    res: dict[str, Any] = {"split": split, "protocol": protocol, "bptt": bptt,
                           "checkpoint": str(run.checkpoint), "averaged": run.averaged,
                           "world_size": world, "corpus": str(d)}
    if dynamic is not None:
        if world > 1:
            raise UserError("dynamic evaluation runs in one process (batch 1, one adapted "
                            "model); launch it without torchrun.")
        return _evaluate_dynamic(run, d, split, batch_size or 1, dynamic, res, log)
    B = batch_size or default_batch(cfg, split, protocol)
    res["batch_size"] = B
    if B % world:
        raise UserError(f"{B} evaluation streams cannot be split over {world} ranks; pass "
                        f"--batch_size with a multiple of {world} (the reference protocol for "
                        f"{split} uses {B}: run it in one process to reproduce it exactly).")

    def loader_for(s: str, b: int):
        return with_progress(make_loader(d, s, b, bptt, device=device, rank=rank,
                                         world_size=world), f"eval {s}")

    if cache is not None:
        res["method"] = "cache"
        if cache.search:
            vb = batch_size or default_batch(cfg, cfg.data.valid_split, protocol)
            table = cache_search(run.model, loader_for(cfg.data.valid_split, vb), cache.window,
                                 cache.normalize)
            if world > 1:  # each rank searched its own streams: combine the sums
                nll = torch.tensor([r["nll"] for r in table], dtype=torch.float64,
                                   device=device)  # NCCL reduces CUDA tensors only
                all_reduce_sum(nll)
                for r, v in zip(table, nll.tolist()):
                    r["nll"] = v / world
            best = min(table, key=lambda r: r["nll"])
            cache = dataclasses.replace(cache, theta=best["theta"], lambdah=best["lambdah"])
            res["search"] = [{**r, **ppl_or_bpc(r["nll"], kind)} for r in table]
            log(f"cache search on {cfg.data.valid_split}: best theta {cache.theta} lambdah "
                f"{cache.lambdah} ({_fmt(ppl_or_bpc(best['nll'], kind))})")
        res["cache"] = dataclasses.asdict(cache)
        total, n = evaluate_cache(run.model, loader_for(split, B), cache)
    else:
        res["method"] = "plain"
        total, n = evaluate_stream(run.model, loader_for(split, B))
    return _finish(res, total, n, kind)


def _evaluate_dynamic(run, d: Path, split: str, B: int, opt: DynamicOptions, res: dict, log) -> dict:
    cfg = run.config
    device = next(run.model.parameters()).device
    kind = run.tokenizer.kind
    res.update(method="dynamic", batch_size=B, bptt=opt.bptt)
    dyn = DynamicEvaluator(run.model)
    nb = dyn.collect_stats(make_loader(d, cfg.data.train_split, opt.stat_batch, opt.bptt, device),
                           opt.stat_batches)
    log(f"dynamic eval: gradient statistics from {nb} windows of {cfg.data.train_split}")
    if opt.search:
        scale = opt.bptt / 5.0
        table = []
        for decay in SEARCH_DECAYS:
            for lr in SEARCH_LRS:
                loader = make_loader(d, cfg.data.valid_split, B, opt.bptt, device)
                s, n = dyn.evaluate(loader, lr * scale, decay * scale, opt.eps, opt.search_tokens)
                table.append({"lr": lr * scale, "decay": decay * scale, "nll": s / n,
                              "tokens": n, **ppl_or_bpc(s / n, kind)})
        best = min(table, key=lambda r: r["nll"])
        opt = dataclasses.replace(opt, lr=best["lr"], decay=best["decay"])
        res["search"] = table
        log(f"dynamic search on {cfg.data.valid_split}: best lr {opt.lr:g} decay {opt.decay:g} "
            f"({_fmt(ppl_or_bpc(best['nll'], kind))} on {best['tokens']} tokens)")
    res["dynamic"] = dataclasses.asdict(opt)
    total, n = dyn.evaluate(with_progress(make_loader(d, split, B, opt.bptt, device),
                                          f"dynamic eval {split}"), opt.lr, opt.decay, opt.eps)
    return _finish(res, total, n, kind)


def _finish(res: dict, total: float, n: int, kind: str) -> dict:
    if n == 0:
        raise UserError(f"split '{res['split']}' of {res['corpus']} has no tokens to evaluate "
                        f"with batch size {res['batch_size']}.")
    res.update(tokens=n, nll=total / n, **ppl_or_bpc(total / n, kind))
    return res


def _fmt(m: dict) -> str:
    return " ".join(f"{k} {v:.4f}" if k == "bpc" else f"{k} {v:.2f}" for k, v in m.items())


def result_path(res: dict) -> Path:
    """<step dir>/eval-<split>[-fast][-cache|-dynamic].json, beside (never inside) model.pt."""
    name = f"eval-{res['split']}"
    if res["protocol"] != "reference" and res["method"] != "dynamic":
        name += f"-{res['protocol']}"
    if res["method"] != "plain":
        name += f"-{res['method']}"
    return Path(res["checkpoint"]) / f"{name}.json"


def write_result(res: dict) -> Path:
    return write_text_atomic(result_path(res), json.dumps(res, indent=2) + "\n")


def _log_wandb(run, res: dict) -> None:
    """Add the result to the run's own W&B run (same id as training, resumed) when it used W&B."""
    mode = wandb_mode(run.config)
    if mode == "disabled":
        return
    try:
        import wandb
    except ImportError:
        return
    run_dir = run_dir_of(run.checkpoint)
    w = wandb_init(wandb, mode, run.config, run_dir)
    key = f"eval/{res['split']}/{res['method']}" + ("/fast" if res["protocol"] == "fast" else "")
    for k, v in res.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            w.summary[f"{key}/{k}"] = v
    w.finish()


def eval_command(path: str, split: str = "test", protocol: str = "reference",
                 batch_size: int = 0, options: dict | None = None) -> None:
    """`dist-lm eval`: load, evaluate (plain / cache / dynamic), print, write JSON (rank 0)."""
    from ..distributed import init_distributed, is_initialized, is_main, pick_device, set_tf32
    from ..run.inference import load_run, read_run_config
    from ..run.layout import find_checkpoint

    opts = parse_options(dict(options or {}))
    check_protocol(protocol)
    ckpt = find_checkpoint(path, opts.checkpoint)
    cfg = read_run_config(run_dir_of(ckpt))
    if split not in (cfg.data.valid_split, cfg.data.test_split, cfg.data.train_split):
        raise UserError(f"unknown split '{split}'; choose {cfg.data.valid_split} or "
                        f"{cfg.data.test_split}.")
    device = pick_device(opts.device)
    set_tf32(device, cfg.train.tf32)  # as the run trained
    init_distributed(device, cfg.dist.backend)
    try:
        run = load_run(ckpt, device=device, averaged=opts.averaged)
        say = print if is_main() else (lambda *a, **k: None)
        res = evaluate_run(run, split=split, protocol=protocol, batch_size=batch_size,
                           bptt=opts.bptt, corpus=opts.corpus or None,
                           cache=opts.cache, dynamic=opts.dynamic, log=say)
    finally:
        if is_initialized():
            torch.distributed.destroy_process_group()
    if is_main():
        try:
            p, unsaved = write_result(res), None
        except OSError as exc:  # a read-only run (someone else's): the number still counts
            p, unsaved = "not saved", exc
        weights = "averaged" if run.averaged else "final"
        say(f"{split} {_fmt({k: res[k] for k in ('ppl', 'bpc') if k in res})} | nll {res['nll']:.4f} | "
            f"{res['tokens']} tokens | {res['method']}, {protocol} protocol, batch {res['batch_size']}, "
            f"bptt {res['bptt']}, {weights} weights | {p}")
        if unsaved is not None:
            print(f"dist-lm: warning: the result above could not be saved beside the checkpoint "
                  f"({result_path(res)}: {unsaved.strerror}) nor logged to W&B; it is only "
                  f"printed.", file=sys.stderr, flush=True)
            return
        _log_wandb(run, res)
