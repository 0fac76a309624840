"""A small Python API over trained runs: load, evaluate, score, generate.

    from dist_lm.api import load_run, evaluate, score_text, generate

    run = load_run("runs/ptb")                           # best validation checkpoint, eval mode
    run = load_run("runs/ptb", checkpoint="latest")      # or the newest one, or "step-N"
    evaluate(run, split="test")                          # {"ppl": ..., "nll": ..., "tokens": ...}
    evaluate(run, split="test", cache={"window": 500, "theta": 0.66, "lambdah": 0.13})
    evaluate(run, split="test", dynamic={"lr": 5e-5, "decay": 2e-3})
    score_text(run, "the stock rose\\n")[0]["total"]     # log p(sentence), natural log
    generate(run, prompt="the company", length=30, top_p=0.9, seed=1)   # -> list of texts

Every function also accepts a path instead of a loaded Run. Nothing here writes files:
`dist-lm eval` is what stores results beside the checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

from .config import CacheOptions, DynamicOptions, Keys, read_options, validate
from .errors import UserError
from .eval.evaluate import evaluate_run
from .eval.generate import generate_text
from .eval.score import score_text as _score_text
from .run.inference import Run, load_run

__all__ = ["Run", "load_run", "evaluate", "score_text", "generate"]


def _run(run: Run | str | os.PathLike) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def _opts(cls, value, group: str):
    """api.evaluate's cache= / dynamic=: None or False (off), True (the defaults), an options
    object, or a dict of its keys read as `dist-lm eval --GROUP.KEY` options are."""
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    if isinstance(value, cls):
        validate(value)
        return value
    if not isinstance(value, dict):
        raise UserError(f"{group}= takes True, a dict of {cls.__name__} keys or a {cls.__name__}; "
                        f"got {value!r}.")
    return read_options(cls, value, Keys(f"{group} option"))


def evaluate(run: Run | str, split: str = "test", protocol: str = "reference", batch_size: int = 0,
             bptt: int = 0, corpus: str | None = None,
             cache: dict | CacheOptions | bool | None = None,
             dynamic: dict | DynamicOptions | bool | None = None) -> dict[str, Any]:
    """Perplexity (word/bpe: "ppl") or bits per character (char/byte: "bpc") on a split.

    protocol "reference": 10 streams for valid, 1 for test, fixed bptt, hidden state carried;
    "fast": 64 streams. `cache` / `dynamic`: True for the defaults or a dict of options
    (see CacheOptions / DynamicOptions in dist_lm/config/options.py; a misspelt key or a
    bad value is a UserError naming it). Returns the result dict
    ("nll" = mean NLL per predicted token, "tokens", the options used, ...).
    """
    return evaluate_run(_run(run), split=split, protocol=protocol, batch_size=batch_size,
                        bptt=bptt, corpus=corpus, cache=_opts(CacheOptions, cache, "cache"),
                        dynamic=_opts(DynamicOptions, dynamic, "dynamic"), log=lambda *a, **k: None)


def score_text(run: Run | str, text: str, per: str = "line") -> list[dict]:
    """Per-token log-probabilities of `text`: one record per non-blank line (per="line") or
    one for the whole text (per="text"), with "tokens", "logprobs", "total", "avg", "n_unk"."""
    return _score_text(_run(run), text, per=per)


def generate(run: Run | str, prompt: str = "", length: int = 100, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, samples: int = 1) -> list[str]:
    """`samples` texts: the prompt followed by `length` sampled tokens (same seed, same text)."""
    return generate_text(_run(run), prompt=prompt, length=length, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed, samples=samples)
