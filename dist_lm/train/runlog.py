"""What a training run writes about itself: the start-of-run lines, one record per log
interval (loss, lr, throughput, the gradient noise scale, the scaling efficiency), the
validation records, the left-out steps, the final record and the run's summary (W&B and
metrics.jsonl through metrics.writer.MetricsSink). The Trainer decides when; RunLog says what.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import distributed as D
from ..metrics.meter import ThroughputMeter, perplexity_fields
from ..metrics.writer import MetricsSink
from .lockstep import await_sweep
from .noise_scale import ADVICE_AFTER, mask_noise_note


class RunLog:
    """The run log of one Trainer (`tr`), whose counters it reads. `interval` holds the sums of
    the current log interval (loss and grad norm stay on the device, no host sync per step,
    until the interval is written); `run_tps` the tokens/s of every interval written."""

    def __init__(self, trainer, resumed: Path | None):
        tr = self.tr = trainer
        t = tr.cfg.train
        self.sink = MetricsSink(t.run_dir, tr.cfg, enabled=tr.rank == 0,
                                total_steps=t.max_steps or 0, initial_step=tr.step,
                                resume_step=None if resumed is None else tr.step)
        self.announce(resumed)
        self.meter = ThroughputMeter(tr.world)
        self.baseline = tr.scaling_baseline.tokens_per_s()  # 0: no scaling efficiency
        self.run_tps: list[float] = []
        self.interval = self.new_interval()
        self.advised = False  # the critical-batch line printed during the run

    def announce(self, resumed: Path | None) -> None:
        """Rank 0's start-of-run lines: the lr rule, the batch geometry, where it resumed."""
        tr = self.tr
        if tr.rank != 0:
            return
        print(f"dist-lm: {tr.schedule.scaling.describe()}", flush=True)
        print(f"dist-lm: {tr.batch.describe()}", flush=True)
        note = mask_noise_note(tr.cfg) if tr.schedule.adaptive else None
        if note:
            print(f"dist-lm: note: {note}", flush=True)
        if resumed is not None:
            print(f"dist-lm: resumed from {resumed} (step {tr.step}, epoch {tr.epoch}, "
                  f"{tr.elapsed:.0f} s trained)", flush=True)

    # ---- the log interval ----------------------------------------------------------------

    def new_interval(self) -> dict:
        """Sums over one log interval; loss and grad norm stay on the device (no host sync per
        step) until the interval is logged."""
        zero = torch.zeros((), dtype=torch.float64, device=self.tr.device)
        return {"loss": zero, "n": 0, "gnorm": zero}

    def add_step(self, seq_len: int, gnorm, wait: float) -> None:
        """An applied step: its grad norm, its tokens and the time it waited for its batch."""
        self.interval["n"] += 1
        self.interval["gnorm"] = self.interval["gnorm"] + gnorm
        self.meter.add(seq_len * self.tr.cfg.train.global_batch, wait)
        self.sink.progress(1)

    def write_interval(self, lr: float, seq_len: int) -> None:
        """Log the interval's record and start the next interval."""
        rec = self.interval_record(lr, seq_len)
        self.run_tps.append(rec["tokens_per_s"])
        self.sink.log(rec)
        self.sink.progress(0, loss=rec["loss"])
        self.interval = self.new_interval()

    def interval_record(self, lr: float, seq_len: int) -> dict:
        tr, interval = self.tr, self.interval
        # on the device: NCCL reduces CUDA tensors only
        buf = torch.stack([interval["loss"], torch.tensor(float(interval["n"]), dtype=torch.float64,
                                                          device=tr.device)])
        D.all_reduce_sum(buf)  # the mean loss over every rank's streams
        loss = float(buf[0] / buf[1])
        rec = {"step": tr.step, "epoch": tr.epoch_f(), "loss": loss,
               **perplexity_fields(loss, tr.char_level), "lr": lr, "seq_len": seq_len,
               "grad_norm": float(interval["gnorm"]) / max(1, interval["n"]),
               "averaging": int(tr.averaging), "tokens": tr.tokens,
               "elapsed_s": tr.elapsed, **self.meter.snapshot()}
        if tr.noise:
            rec.update(tr.noise.record())
        if self.baseline > 0:
            rec["scaling_efficiency"] = rec["tokens_per_s"] / (self.baseline * tr.world)
        return rec

    def skipped(self, lr: float, seq_len: int) -> None:
        """The line of a non-finite step left out (Trainer._count_skip has counted it)."""
        tr = self.tr
        self.sink.log({"step": tr.step, "event": "non-finite", "skipped_steps": tr.bad_steps,
                       "in_a_row": tr.bad_run, "seq_len": seq_len, "lr": lr})

    # ---- validation and the end of the run -----------------------------------------------

    def validation(self, val: float, fields: dict, eval_s: float, event: str | None,
                   target: float) -> None:
        """A validation's record (the sweep's pruner reads it before the run goes on), the best
        so far in the summary, and rank 0's line on an NT-ASGD switch or the target reached."""
        tr = self.tr
        rec = {"step": tr.step, "epoch": tr.epoch_f(), "valid_loss": val, **fields,
               "averaging": int(tr.averaging), "valid_seconds": eval_s,
               "elapsed_s": tr.elapsed, "tokens": tr.tokens}
        if event:
            rec["event"] = event
        self.sink.log(rec)
        await_sweep(tr.rank)  # under `dist-lm sweep`: its pruner reads this first
        best = perplexity_fields(tr.best_val, tr.char_level, "best_valid_")
        self.sink.set_summary(**best, best_valid_loss=tr.best_val, best_step=tr.best_step,
                              **self.target_fields())
        if tr.rank == 0 and tr.noise and not self.advised and \
                tr.noise.measured() >= ADVICE_AFTER:
            # once, as soon as the estimate spans the EMA's window; again at the end of the run
            advice = tr.noise.advice()
            if advice:
                self.advised = True
                print(f"dist-lm: at step {tr.step}, {advice}", flush=True)
        if tr.rank == 0 and event in ("switch", "target"):
            what = ("switching to averaged SGD (NT-ASGD)" if event == "switch" else
                    f"target {target:g} reached ({self.target_fields()['time_to_target_s']:.0f}"
                    f" s, {tr.target_tokens:,} tokens)")
            print(f"dist-lm: {what} at step {tr.step}", flush=True)

    def final(self, reason: str | None, test: float) -> dict:
        """The final record (valid and test of the best checkpoint) and summary; a one-device
        run with train.record_baseline records its throughput as the scaling baseline."""
        tr = self.tr
        rec = {"step": tr.step, "epoch": tr.epoch_f(), "final": True, "stop": reason,
               "best_step": tr.best_step, "valid_loss": tr.best_val,
               **perplexity_fields(tr.best_val, tr.char_level, "valid_"), "test_loss": test,
               **perplexity_fields(test, tr.char_level, "test_"),
               "averaging": int(tr.averaging), "train_seconds": tr.elapsed,
               "tokens": tr.tokens, **self.target_fields()}
        if tr.noise:  # the critical batch measured, and one line when the batch is far above it
            rec.update({k: v for k, v in tr.noise.record().items() if k.startswith("b_noise")})
            advice = tr.noise.advice() if tr.rank == 0 else None
            if advice:
                print(f"dist-lm: {advice}", flush=True)
        self.sink.log(rec)
        self.sink.set_summary(**{k: v for k, v in rec.items() if k.startswith(("test_", "valid_"))})
        tr.scaling_baseline.record(self.run_tps)
        return rec

    def target_fields(self) -> dict:
        tr = self.tr
        if tr.target_step < 0:
            return {}
        return {"time_to_target_s": tr.target_elapsed, "tokens_to_target": tr.target_tokens,
                "target_step": tr.target_step}

    def close(self) -> None:
        self.sink.close()
