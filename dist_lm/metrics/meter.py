"""What training measures: tokens/s and the share of time spent waiting for data per log
interval (ThroughputMeter), and a mean NLL as perplexity or bits per character.

    meter = ThroughputMeter(world_size)
    meter.add(tokens=seq_len * global_batch, wait=data_wait_s)   # once per optimizer step
    meter.snapshot()        # tokens_per_s, tokens_per_s_per_device, data_wait_share, interval_s
"""

from __future__ import annotations

import math
import time
from typing import Callable


class ThroughputMeter:
    """Tokens/s over the current log interval and the share of time spent waiting for data."""

    def __init__(self, world_size: int = 1, clock: Callable[[], float] = time.perf_counter):
        self.world_size = world_size
        self.clock = clock  # seconds, monotonic
        self.reset()

    def reset(self) -> None:
        self.t0 = self.clock()
        self.tokens = 0
        self.wait = 0.0
        self.steps = 0

    def add(self, tokens: int, wait: float = 0.0) -> None:
        self.tokens += tokens
        self.wait += wait
        self.steps += 1

    def snapshot(self, reset: bool = True) -> dict:
        dt = max(1e-9, self.clock() - self.t0)
        tps = self.tokens / dt
        out = {"tokens_per_s": tps, "tokens_per_s_per_device": tps / self.world_size,
               "data_wait_share": min(1.0, self.wait / dt), "interval_s": dt}
        if reset:
            self.reset()
        return out


def ppl_or_bpc(mean_nll: float, kind: str) -> dict:
    """{'ppl': ...} for word/bpe vocabularies, {'bpc': ...} for char/byte (mean NLL / ln 2)."""
    if kind in ("char", "byte"):
        return {"bpc": mean_nll / math.log(2)}
    return {"ppl": math.exp(min(mean_nll, 700.0))}


def perplexity_fields(mean_nll: float, char_level: bool, prefix: str = "") -> dict:
    """ppl_or_bpc for a word (ppl) or character/byte (bpc) corpus, keys prefixed."""
    fields = ppl_or_bpc(mean_nll, "char" if char_level else "word")
    return {prefix + k: v for k, v in fields.items()}
