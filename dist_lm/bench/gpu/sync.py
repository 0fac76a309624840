"""Part `sync`: host synchronisations per training step of a real Trainer run, counted with
torch.cuda.set_sync_debug_mode("warn") over a window of steps and named by the source line that
asked for them (goal: 0 per step). The WT-103 QRNN recipe (bf16, V = 267,735) and the PTB
AWD-LSTM recipe, each on synthetic Zipf tokens. Without CUDA the counts read "n/a".
"""

from __future__ import annotations

import collections
import linecache
import warnings
from pathlib import Path

import torch

from .common import (PTB_CONFIG, WT103_CONFIG, Plan, common_overrides, corpus_sizes, loss_down,
                     train_run, zipf_corpus)


class SyncCounter:
    """Counts host synchronisations (torch.cuda.set_sync_debug_mode("warn") warnings) over
    the Trainer's steps start+1 .. start+n: switched on when step `start + 1` begins and off
    when step `start + n + 1` begins, so every sync of those steps (forward, backward,
    optimizer, logging, the loader) is in. `where` counts them by file:line."""

    def __init__(self, trainer, start: int, n: int):
        self.trainer, self.start, self.n = trainer, start, n
        self.count: int | None = None
        self.where: collections.Counter = collections.Counter()
        self._cm = self._log = None
        inner = trainer.train_step

        def train_step(inputs, targets):
            step = trainer.step
            if step == start + n and self._cm is not None:
                self._stop()
            if step == start and self._cm is None and self.count is None:
                self._cm = warnings.catch_warnings(record=True)
                self._log = self._cm.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            return inner(inputs, targets)

        trainer.train_step = train_step

    def _stop(self) -> None:
        torch.cuda.set_sync_debug_mode(0)
        hits = [w for w in self._log if "synchroniz" in str(w.message)]
        self.count = len(hits)
        for w in hits:
            code = linecache.getline(w.filename, w.lineno).strip()
            self.where[f"{Path(w.filename).name}:{w.lineno} {code}"[:160]] += 1
        self._cm.__exit__(None, None, None)
        self._cm = None

    def per_step(self) -> float | None:
        if self._cm is not None:
            self._stop()
        return None if self.count is None else self.count / self.n


def sync_rows(plan: Plan, ctx, label: str, config: str, vocab: int, batch: int,
              bptt: int) -> list[dict]:
    tmp = Path(ctx["tmp"])
    start, n = plan.sync_steps
    steps = start + n + 2
    data = zipf_corpus(tmp / "data", vocab, corpus_sizes(plan, batch, bptt, 2, steps))
    over = common_overrides(plan, tmp / "runs" / f"sync_{label.split()[0]}", data, steps,
                            max(1, steps // 2))
    cuda = plan.device == "cuda"
    res = train_run(config, over, (lambda tr: SyncCounter(tr, start, n)) if cuda else None)
    counter = res["extra"]
    per = counter.per_step() if counter else None
    rows = [{"name": f"{label}: host syncs per step (steps {start + 1}..{start + n})",
             "value": "n/a" if per is None else per, "unit": "syncs", "target": 0,
             "target_met": per == 0 if per is not None else None, "target_text": "0",
             "where": dict(counter.where) if counter else {}},
            loss_down(label, res["losses"])]
    for where, k in (counter.where.most_common(8) if counter else []):
        rows.append({"name": f"  {label} sync: {where}", "value": k / n, "unit": "per step"})
    return rows


def cases(plan: Plan, ctx) -> list[tuple[str, object]]:
    wt_b, wt_t = (4, 12) if plan.dry else (60, 140)
    pb, pt = (4, 12) if plan.dry else (20, 70)
    return [("WT-103 QRNN", lambda: sync_rows(plan, ctx, "WT-103 QRNN recipe, bf16", WT103_CONFIG,
                                              plan.wt103_vocab, wt_b, wt_t)),
            ("PTB AWD-LSTM", lambda: sync_rows(plan, ctx, "PTB AWD-LSTM recipe, fp32",
                                               PTB_CONFIG, plan.ptb_vocab, pb, pt))]
