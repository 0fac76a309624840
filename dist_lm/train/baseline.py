"""A training run's side of the single-device baselines (dist_lm.metrics.baselines): a
multi-rank run reads the tokens/s its scaling efficiency divides by (tokens/s / (baseline x
world)); a one-device run with train.record_baseline records its own."""

from __future__ import annotations

import torch

from ..config import Config, to_dict
from ..metrics.baselines import baseline_key, device_kind, read_baseline, record_baseline


class ScalingBaseline:
    """The baseline of this model, vocabulary, micro-batch, bptt, dtype and device kind."""

    def __init__(self, cfg: Config, vocab_size: int, micro: int, dtype: str,
                 device: torch.device, world: int, rank: int):
        self.cfg, self.vocab_size, self.micro, self.dtype = cfg, vocab_size, micro, dtype
        self.device, self.world, self.rank = device, world, rank

    def key(self) -> str:
        return baseline_key(to_dict(self.cfg)["model"], self.vocab_size, self.micro,
                            self.cfg.train.bptt, self.dtype, device_kind(self.device))

    def tokens_per_s(self) -> float:
        """Single-device tokens/s (train.baseline_tokens_per_s, else the recorded one); only
        multi-rank runs use one (0: none recorded, the efficiency is left out with a note saying
        how to record one)."""
        t = self.cfg.train
        if self.world == 1:
            return 0.0
        tps = t.baseline_tokens_per_s or read_baseline(self.key())
        if tps <= 0 and self.rank == 0:
            # the one-device run must use this run's micro batch: left to choose, it would
            # pick its own for all the streams on one device, and record another key
            print(f"dist-lm: scaling efficiency left out: no single-device baseline recorded for "
                  f"this model (vocab {self.vocab_size}, micro-batch {self.micro}, bptt "
                  f"{t.bptt}, {self.dtype}, {device_kind(self.device)}); record one with a "
                  f"one-device run of this config with --train.micro_batch={self.micro} "
                  f"--train.record_baseline=true, or pass --train.baseline_tokens_per_s=N",
                  flush=True)
        return tps

    def record(self, run_tps: list[float]) -> None:
        """At the end of a run with train.record_baseline: the median of its logged intervals'
        tokens/s (rank 0 of a one-device run)."""
        if not self.cfg.train.record_baseline or self.rank != 0:
            return
        if self.world > 1 or not run_tps:
            print("dist-lm: train.record_baseline needs a single-device run with at least one "
                  "logged interval; no baseline recorded", flush=True)
            return
        tps = sorted(run_tps)[len(run_tps) // 2]
        record_baseline(self.key(), tps, str(self.cfg.train.run_dir))
        print(f"dist-lm: recorded {tps:,.0f} tokens/s as the single-device baseline", flush=True)
