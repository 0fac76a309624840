"""The Trainer: one training loop for the local, DDP and DeepSpeed engines.

    dist-lm train configs/cpu_smoke.toml
    torchrun --nproc_per_node 2 -m dist_lm train configs/ptb_awd_lstm.toml --dist.engine=ddp
    deepspeed --num_gpus 8 -m dist_lm train configs/wt103_qrnn_12h.toml --dist.engine=deepspeed

Read top to bottom: `__init__` builds the pieces (threads and process group -> batch geometry
-> streams -> model, same seed on every rank -> per-rank dropout generator -> engine -> NT-ASGD
and the lr schedule -> checkpointer); `fit` opens the run directory (lock; fresh, resumed or
refused), then runs epochs of `train_step`, each step followed by `_after_step` (log, validate,
save); `_finish` tests the best checkpoint. The three decisions are made in one place each:
`stop_reason` (when to stop), `_should_validate` and `_should_save`, asked at
`_validate_and_save(at)` after a step, at an epoch's end, at the run's end and on a signal.

One optimizer step (`train_step`) takes the next window of all B = global_batch streams: this
rank's b = B / W columns, split into accum = b / m column groups of m streams (each with its
own hidden state; geometry.BatchGeometry), forward/backward in turn, then one engine step. The
step's lr is schedule(step, progress, epoch) * seq_len / bptt (AWD-LSTM), where progress is the
fraction of the run's bound (seconds, steps or epochs) spent. At the end of each epoch (or every
train.eval_every_steps) the validation loss, computed with the NT-ASGD averaged weights once
averaging is on, feeds NT-ASGD and the plateau schedule; a new best is checkpointed at once,
and the end-of-run test perplexity is that checkpoint's.

Pieces of their own: geometry (the batch split), device_skip (non-finite steps left out on the
device, no host sync per step), faults (the fault tests' hook), baseline (the single-device
baseline of the scaling efficiency), engines, optim, checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable

import torch

from .. import distributed as D
from ..config import RESOLVED, Config, load_config
from ..data.prepared import PreparedCorpus
from ..errors import Stopped, UserError
from ..fileio import write_text_atomic
from ..metrics.meter import ThroughputMeter, perplexity_fields
from ..metrics.writer import MetricsSink
from ..run.checkpointer import Checkpointer, RNGState
from ..run.directory import open_run
from ..run.files import load_tensor_file, load_weights, weights_of
from ..run.layout import AVERAGED, checkpoint_dir, find_checkpoint, list_checkpoints
from ..run.stop import StopSignals
from .baseline import ScalingBaseline
from .device_skip import DeviceSkip
from .engines import STEP_SKIP_ENV, build_engine
from .faults import Faults
from .geometry import BatchGeometry
from .lockstep import await_sweep
from .noise_scale import noise_scale_for
from .optim import NTASGD, LRSchedule, ParamAverager, uses_averaging


def train_command(config: str, resume: str | None = None, overwrite: bool = False,
                  overrides: dict | None = None) -> None:
    cfg = load_config(config, overrides)
    Trainer(cfg).fit(resume=resume, overwrite=overwrite)


class _Hidden:
    """The trainer's carried hidden states as a Stateful piece of the rank file."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer

    def state_dict(self) -> dict:
        return {"hidden": self.trainer.hidden}

    def load_state_dict(self, sd: dict) -> None:
        h = sd["hidden"]
        self.trainer.hidden = None if h is None else [_to(x, self.trainer.device) for x in h]


class Trainer:
    """Builds everything from a Config; `fit()` trains.

    `clock` (seconds, monotonic) is what time budgets and time-based schedules read; tests
    pass a deterministic one. `faults` is the fault tests' hook (faults.Faults); by default it
    is read from the DIST_LM_FAULT_* environment, once, here (nothing fires when unset).
    """

    def __init__(self, cfg: Config, *, clock: Callable[[], float] = time.perf_counter,
                 faults: Faults | None = None):
        self.cfg, self.clock = cfg, clock
        t = cfg.train
        D.default_threads()
        self.device = D.pick_device(t.device)
        D.setup_process_group(self.device, cfg.dist.engine, cfg.dist.backend)
        self.rank, self.world = D.get_rank(), D.get_world_size()
        self.faults = Faults.from_env(self.rank) if faults is None else faults
        self.batch = BatchGeometry.resolve(t, self.world, self.device)
        self.micro, self.accum = self.batch.micro, self.batch.accum
        self._open_corpus()
        self._build_model()
        self._build_optimisation()
        self._init_state()
        self._build_checkpointer()

    def _open_corpus(self) -> None:
        """The prepared corpus and its three loaders (this rank's streams), checked before
        anything is written: a damaged shard stops the run here."""
        cfg, t = self.cfg, self.cfg.train
        corpus = PreparedCorpus.open(cfg.shards_dir(), cfg.data.corpus,
                                     shard_url=cfg.data.shard_url, device=self.device)
        self.corpus_dir = corpus.dir
        self.vocab_size, self.char_level = corpus.vocab_size, corpus.char_level
        self.train_loader = corpus.loader(cfg.data.train_split, t.global_batch, t.bptt,
                                          variable=t.variable_bptt, seed=t.seed,
                                          max_seq_len=t.max_seq_len, rank=self.rank,
                                          world=self.world)
        shares = {"bptt": t.bptt, "rank": self.rank, "world": self.world}
        self.valid_loader, self.valid_reduce = corpus.eval_loader(
            cfg.data.valid_split, cfg.data.eval_batch_size, **shares)
        self.test_loader, self.test_reduce = corpus.eval_loader(
            cfg.data.test_split, cfg.data.test_batch_size, **shares)
        for split_loader in (self.train_loader, self.valid_loader, self.test_loader):
            split_loader.check()

    def _build_model(self) -> None:
        """The model with identical parameters on every rank (the seed, or train.finetune_from),
        a per-rank dropout generator, then the engine that wraps and steps it."""
        from ..models import build_model

        cfg, t = self.cfg, self.cfg.train
        torch.manual_seed(t.seed)
        module = build_model(cfg.model, self.vocab_size).to(self.device)
        if t.finetune_from:
            load_weights(module, find_checkpoint(t.finetune_from))
        if self.rank > 0:  # rank 0 continues the seeded generator, like the reference
            torch.manual_seed(t.seed + 1000 * self.rank)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(t.seed + 1000 * self.rank)
        self.engine = build_engine(module, cfg, self.device, self.world, self.accum, self.micro)
        self.module = self.engine.module
        if t.compile:
            if cfg.dist.engine == "deepspeed":
                raise UserError("train.compile works with dist.engine=local or ddp; DeepSpeed "
                                "compiles through its own config. Drop --train.compile.")
            # dynamic: window lengths vary every step (variable BPTT), one graph serves them all
            self.engine.model = torch.compile(self.engine.model, dynamic=True)
        self.autocast = t.bf16 and cfg.dist.engine != "deepspeed"  # DeepSpeed: its bf16 mode
        self.dtype = "bf16" if t.bf16 else "fp32"
        D.set_tf32(self.device, t.tf32)
        self.scaling_baseline = ScalingBaseline(cfg, self.vocab_size, self.micro, self.dtype,
                                                self.device, self.world, self.rank)

    def _build_optimisation(self) -> None:
        """NT-ASGD (the trigger and the running average) and the lr schedule."""
        cfg, t, B = self.cfg, self.cfg.train, self.cfg.train.global_batch
        self.averager = ParamAverager(self.module)
        self.ntasgd = NTASGD(cfg.optim.nonmono, enabled=uses_averaging(cfg.optim) or t.finetune,
                             finetune=t.finetune)
        self.schedule = LRSchedule(cfg.schedule, cfg.optim.lr, B, cfg.optim.name)
        self.noise = noise_scale_for(cfg, self.module, micro=self.micro, accum=self.accum,
                                     world=self.world, device=self.device,
                                     base_batch=self.schedule.scaling.base_batch)
        L = self.train_loader.stream_len
        self.steps_per_epoch = max(1.0, (L - 1) / (t.bptt * (0.975 if t.variable_bptt else 1.0)))

    def _init_state(self) -> None:
        """The trainer's own state (state_dict: the counters; everything else is derived)."""
        self.step = self.epoch = self.epoch_step = self.tokens = 0
        self.elapsed = 0.0  # training seconds of the run, over every resume
        self.best_val, self.best_step, self.last_val_step = math.inf, -1, -1
        self.target_step, self.target_elapsed, self.target_tokens = -1, 0.0, 0
        self.bad_steps = 0  # non-finite steps left out, over the run
        self.bad_run = 0    # ... in a row, now
        self.signalled = 0  # the stop signal every rank agreed on (0: none)
        self._signal = 0    # the one this process received
        self.step_skip = os.environ.get(STEP_SKIP_ENV, "auto")  # auto | device | host
        self.device_skip = DeviceSkip(self)  # non-finite steps left out without a host sync
        self.hidden = None
        self.last_saved = -1

    def _build_checkpointer(self) -> None:
        """Every stateful piece of the run, saved and restored by one Checkpointer."""
        cfg, t, B = self.cfg, self.cfg.train, self.cfg.train.global_batch
        self.checkpointer = Checkpointer(
            Path(t.run_dir), self.rank, model=self.module, engine=self.engine,
            shared={"trainer": self, "schedule": self.schedule, "ntasgd": self.ntasgd,
                    "averager": self.averager,
                    **({"noise": self.noise} if self.noise else {})},
            per_rank={"loader": self.train_loader, "hidden": _Hidden(self),
                      "rng": RNGState(self.device)},  # the RNG last: nothing after it may draw
            meta={"world_size": self.world, "global_batch": B, "engine": cfg.dist.engine})

    # ---- state ---------------------------------------------------------------------------

    _COUNTERS = ("step", "epoch", "epoch_step", "tokens", "best_step", "last_val_step",
                 "target_step", "target_tokens", "bad_steps", "bad_run")

    def state_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self._COUNTERS}, "elapsed": self.elapsed,
                "best_val": self.best_val, "target_elapsed": self.target_elapsed,
                "micro_batch": self.micro}  # checked on resume (_check_resume), not loaded

    def load_state_dict(self, sd: dict) -> None:
        for k in self._COUNTERS:
            setattr(self, k, int(sd[k]))
        for k in ("elapsed", "best_val", "target_elapsed"):
            setattr(self, k, float(sd[k]))

    # ---- the run directory ---------------------------------------------------------------

    def _open_run(self, resume: str | None, overwrite: bool) -> Path | None:
        """Rank 0 opens the run directory (run.directory.open_run: the lock, fresh / resume /
        refuse, the checks, then the run's files), checking a checkpoint's trainer.pt against
        this run first; every rank then loads the checkpoint. A refused or failed start leaves
        the directory as it was."""
        start, error = None, None
        if self.rank == 0:
            def check(start: Path) -> None:
                st = self.checkpointer.read_shared(start)  # format, world size, batch, engine
                self._check_resume(st, start)

            try:
                self.lock, start = open_run(Path(self.cfg.train.run_dir), self.cfg,
                                            self.corpus_dir, resume, overwrite, check=check,
                                            write=self._write_resolved)
            except UserError as exc:
                error = str(exc)
        start, error = D.broadcast_object((None if start is None else str(start), error))
        if error is not None:
            raise UserError(error)
        if start is None:
            return None
        start = Path(start)
        self.checkpointer.load(start, self.checkpointer.read_shared(start))
        if self.averager.count > 0:
            self.averager.load_average(load_tensor_file(start / AVERAGED))
        self.last_saved = self.step
        return start

    def resolved(self) -> dict:
        """What this run derived from its config: the lr rule (optim.LRScaling) and the batch
        geometry; config.json's "resolved" block and the start-of-run lines."""
        return {"lr_scaling": self.schedule.scaling.as_dict(), "batch": self.batch.as_dict()}

    def _write_resolved(self, run_dir: Path) -> None:
        """Add the "resolved" block to the config.json write_run_files just wrote (from_dict
        skips it; a resume rewrites it with the same values, which _check_resume ensures)."""
        p = run_dir / "config.json"
        table = json.loads(p.read_text())
        table[RESOLVED] = self.resolved()
        write_text_atomic(p, json.dumps(table, indent=2, sort_keys=True) + "\n")

    def _check_resume(self, st: dict, start: Path) -> None:
        """Refuse a checkpoint whose lr rule or micro batch differ from what this run resolved
        (before anything is written): the lr must not change mid-run because a default or the
        config file did, and the carried hidden states are per micro batch."""
        self.schedule.check_resume(st["schedule"], str(start))
        micro = st["trainer"].get("micro_batch")
        if micro is not None and int(micro) != self.micro:
            raise UserError(f"cannot resume from {start}: it ran micro batches of {micro} "
                            f"streams and this run chose {self.micro} (the carried hidden states "
                            f"are per micro batch); set --train.micro_batch={micro}.")

    # ---- the loop ------------------------------------------------------------------------

    def fit(self, resume: str | None = None, overwrite: bool = False) -> dict:
        """Open the run (fresh or resumed), train epoch after epoch until the stop decision
        says so, finish; returns the final record (valid and test of the best checkpoint)."""
        cfg, t = self.cfg, self.cfg.train
        resumed = self._open_run(resume, overwrite)
        self.sink = sink = MetricsSink(t.run_dir, cfg, enabled=self.rank == 0,
                                       total_steps=t.max_steps or 0, initial_step=self.step,
                                       resume_step=None if resumed is None else self.step)
        self._announce(resumed)
        self.meter = ThroughputMeter(self.world)
        self.baseline = self.scaling_baseline.tokens_per_s()  # 0: no scaling efficiency
        self.run_tps: list[float] = []
        self.interval = self._new_interval()
        self._elapsed0, self._t0 = self.elapsed, self.clock()
        stops = StopSignals(self._on_signal).install()  # SIGTERM / SIGINT: stop resumably
        try:
            while self.stop_reason() is None:
                self._train_epoch()
            if self.stop_reason() in ("signal", "non-finite"):
                self._stop_early()
            return self._finish()
        finally:
            stops.restore()
            self.train_loader.close()  # a stop mid-epoch leaves shard readers (pipe:) open
            sink.close()
            if self.rank == 0:
                self.lock.release()

    def _train_epoch(self) -> None:
        """Steps through the loader's epoch from its position (a resume continues mid-epoch)
        until the epoch ends or the run must stop."""
        if self.hidden is None:
            self.hidden = self.init_hidden()
        self.module.train()
        wait_t0 = time.perf_counter()
        for inputs, targets in self.train_loader:
            wait = time.perf_counter() - wait_t0
            lr, seq_len, gnorm = self.train_step(inputs, targets)
            self._after_step(lr, seq_len, gnorm, wait)
            if self.stop_reason() is not None:
                return
            wait_t0 = time.perf_counter()
        self._end_epoch()

    def _announce(self, resumed: Path | None) -> None:
        """Rank 0's start-of-run lines: the lr rule, the batch geometry, where it resumed."""
        if self.rank != 0:
            return
        print(f"dist-lm: {self.schedule.scaling.describe()}", flush=True)
        print(f"dist-lm: {self.batch.describe()}", flush=True)
        if resumed is not None:
            print(f"dist-lm: resumed from {resumed} (step {self.step}, epoch {self.epoch}, "
                  f"{self.elapsed:.0f} s trained)", flush=True)

    def _on_signal(self, signum: int) -> None:
        """SIGTERM / SIGINT (preemption, Ctrl-C): finish the step, checkpoint, exit resumable
        (run.stop.StopSignals; a second signal acts at once)."""
        self._signal = signum

    def _stop_early(self) -> None:
        """A stop on a signal checkpoints the step every rank agreed on and raises Stopped
        (exit 75: resumable); too many non-finite steps in a row is a UserError naming the step
        and the last good checkpoint (the run stops rather than rolling back with a lowered lr:
        which lr would help is the user's call, and `--resume` from that checkpoint with
        --optim.lr=... is one command)."""
        if self.stop_reason() == "signal":
            self._validate_and_save("signal")
            name = signal.Signals(self.signalled).name
            raise Stopped(f"stopped by {name} at step {self.step}; checkpoint "
                          f"{checkpoint_dir(self.cfg.train.run_dir, self.step)}"
                          f" written; continue with --resume auto")
        last = list_checkpoints(self.cfg.train.run_dir)
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written"
        raise UserError(f"{self.bad_run} optimizer steps in a row had a non-finite loss or "
                        f"gradient norm, the last at step {self.step + 1}; none was applied and "
                        f"the run stopped ({where}). Lower --optim.lr or --optim.clip and resume "
                        f"from it with --resume auto, or raise --train.max_bad_steps.")

    # ---- one optimizer step --------------------------------------------------------------

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor):
        """One optimizer step over this rank's streams; returns (lr, seq_len, grad norm)."""
        from ..models import detach_hidden

        seq_len = inputs.shape[0]
        lr = self.set_lr(seq_len)
        if self.noise:
            self.noise.begin(self.step)
        check = self.cfg.train.max_bad_steps >= 0
        step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        hidden = list(self.hidden)
        for j in range(self.accum):
            cols = slice(j * self.micro, (j + 1) * self.micro)
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                out = self.engine.model(inputs[:, cols], self.hidden[j], targets[:, cols])
                nll = out.nll.float().mean()
                if j == 0 and self.faults.nan_loss(self.step + 1):  # fault injection (tests)
                    nll = nll * float("nan")
                loss = nll + out.ar + out.tar
            self.engine.backward(loss, last=j == self.accum - 1)
            hidden[j] = detach_hidden(out.hidden)
            step_loss = step_loss + loss.detach().double() / self.accum
        if self.engine.can_skip:
            gnorm = self.engine.clip(self.cfg.optim.clip)
            if check and self.device_skip.active():
                return self.device_skip.step(lr, seq_len, gnorm, step_loss, hidden)
            self.device_skip.settle()  # the host path: the pending device-side steps first
            bad = ~(torch.isfinite(gnorm) & torch.isfinite(step_loss)) if check else None
            if self._agree(bad):
                return self._skip_step(lr, seq_len)
            self.engine.apply()
            if self.noise:
                self.noise.update(gnorm)  # the unclipped norm (clip returns it)
        else:  # DeepSpeed steps as one: a non-finite loss is caught before it, and stops the run
            if self._agree(~torch.isfinite(step_loss) if check else None):
                self.bad_run = self.cfg.train.max_bad_steps + 1
                return self._skip_step(lr, seq_len)
            gnorm = self.engine.step(self.cfg.optim.clip)
        self.bad_run = 0
        self.hidden = hidden
        self.interval["loss"] = self.interval["loss"] + step_loss
        if self.ntasgd.averaging:
            self.averager.update()
        self.step += 1
        self.epoch_step += 1
        self.tokens += seq_len * self.cfg.train.global_batch
        return lr, seq_len, gnorm

    def _skip_step(self, lr: float, seq_len: int):
        """A non-finite step: nothing applied (parameters, optimizer state, averages, hidden
        states and counters as before it), counted and logged. The window is consumed (the
        loader moves on), so the next step sees the next window."""
        self.engine.skip() if self.engine.can_skip else None
        self._count_skip(lr, seq_len)
        return lr, seq_len, None

    def _count_skip(self, lr: float, seq_len: int) -> None:
        """Count and log a left-out step (the host's; DeviceSkip.settle replays its own here)."""
        self.bad_steps += 1
        self.bad_run += 1
        self.sink.log({"step": self.step, "event": "non-finite", "skipped_steps": self.bad_steps,
                       "in_a_row": self.bad_run, "seq_len": seq_len, "lr": lr})

    def _tick(self, agree: bool = True) -> None:
        """Advance self.elapsed to now; on several ranks to the slowest rank's clock (a
        collective), so every rank's stop and checkpoint decisions stay the same."""
        self.elapsed = self._elapsed0 + (self.clock() - self._t0)
        if agree and self.world > 1:
            buf = torch.tensor([self.elapsed], dtype=torch.float64, device=self.device)
            self.elapsed = float(D.all_reduce_max(buf)[0])

    def _agree(self, bad: torch.Tensor | None) -> bool:
        """Once per step, before the optimizer step: the clock, a stop signal and whether the
        step is non-finite, agreed over ranks (the slowest clock, any rank's signal or bad
        step), so every rank takes the same lr, skip and stop decisions. Returns True when the
        step must be left out. Note: a CPU-GPU sync point (skipped entirely when nothing needs
        it: one rank, max_bad_steps = -1); on CUDA the device-side skip replaces it
        (device_skip.DeviceSkip, settled every log interval)."""
        self._tick(agree=False)  # agreed below, with the rest
        if self.world == 1 and bad is None:
            self.signalled = self._signal
            return False
        buf = torch.stack([torch.tensor(self.elapsed, dtype=torch.float64, device=self.device),
                           torch.tensor(float(self._signal), dtype=torch.float64,
                                        device=self.device),
                           (bad if bad is not None else torch.zeros((), device=self.device))
                           .to(torch.float64)])
        elapsed, sig, skip = D.all_reduce_max(buf).tolist()
        self.elapsed, self.signalled = elapsed, int(sig)
        return skip > 0

    # ---- after a step: log, validate, save -----------------------------------------------

    def _after_step(self, lr: float, seq_len: int, gnorm, wait: float) -> None:
        """Log at its interval; validate and checkpoint when due; the SIGKILL fault injection."""
        cfg = self.cfg
        if gnorm is None:  # a left-out step: nothing to log or save
            return
        self.interval["n"] += 1
        self.interval["gnorm"] = self.interval["gnorm"] + gnorm
        self.meter.add(seq_len * cfg.train.global_batch, wait)
        self.sink.progress(1)
        if self.device_skip.must_settle() and self.device_skip.settle():
            return  # this step was left out on the device
        if self.step % max(1, cfg.log.every_steps) == 0:
            rec = self._interval_record(lr, seq_len)
            self.run_tps.append(rec["tokens_per_s"])
            self.sink.log(rec)
            self.sink.progress(0, loss=rec["loss"])
            self.interval = self._new_interval()
        if self.signalled:  # stopping on a signal: the checkpoint comes next, nothing slow now
            return
        self._validate_and_save("step")
        self.faults.after_step(self.step)

    def _end_epoch(self) -> None:
        self.device_skip.settle()
        self.epoch += 1
        self.epoch_step = 0
        self.hidden = None
        self._validate_and_save("epoch")

    def _new_interval(self) -> dict:
        """Sums over one log interval; loss and grad norm stay on the device (no host sync per
        step) until the interval is logged."""
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        return {"loss": zero, "n": 0, "gnorm": zero}

    def _interval_record(self, lr: float, seq_len: int) -> dict:
        interval = self.interval
        # on the device: NCCL reduces CUDA tensors only
        buf = torch.stack([interval["loss"], torch.tensor(float(interval["n"]), dtype=torch.float64,
                                                          device=self.device)])
        D.all_reduce_sum(buf)  # the mean loss over every rank's streams
        loss = float(buf[0] / buf[1])
        rec = {"step": self.step, "epoch": self.epoch_f(), "loss": loss,
               **perplexity_fields(loss, self.char_level), "lr": lr, "seq_len": seq_len,
               "grad_norm": float(interval["gnorm"]) / max(1, interval["n"]),
               "averaging": int(self.averaging), "tokens": self.tokens,
               "elapsed_s": self.elapsed, **self.meter.snapshot()}
        if self.noise:
            rec.update(self.noise.record())
        if self.baseline > 0:
            rec["scaling_efficiency"] = rec["tokens_per_s"] / (self.baseline * self.world)
        return rec

    # ---- the decisions: when to stop, validate and save ----------------------------------

    def stop_reason(self) -> str | None:
        """The one stop decision; the same on every rank (its inputs are)."""
        t = self.cfg.train
        if self.signalled:
            return "signal"
        if t.max_bad_steps >= 0 and self.bad_run > t.max_bad_steps:
            return "non-finite"
        if t.max_steps and self.schedule.steps_done(self.step) >= t.max_steps:  # adascale: tau
            return "max_steps"
        if not t.max_steps and self.epoch >= t.epochs:
            return "epochs"
        if t.max_seconds and self.elapsed >= t.max_seconds:
            return "max_seconds"
        if self.ntasgd.stop:
            return "nt-asgd"  # finetune: the first non-monotone validation
        if self.target_step >= 0:
            return "target"
        return None

    def _validate_and_save(self, at: str) -> None:
        """The one place validation and checkpoints happen, at `at`: "step" (after an optimizer
        step), "epoch" (an epoch's end), "end" (the run's end) or "signal" (a stop on one)."""
        if self._should_validate(at):
            self._validate()
        if self._should_save(at):
            self.save()

    def _should_validate(self, at: str) -> bool:
        """Every train.eval_every_steps steps, else at each epoch's end; at the run's end when
        its last step was not validated; never on a signal (nothing slow before the checkpoint)."""
        every = self.cfg.train.eval_every_steps
        if at == "step":
            return bool(every) and self.step % every == 0
        if at == "epoch":
            return not every
        return at == "end" and self.last_val_step != self.step

    def _should_save(self, at: str) -> bool:
        """A step is saved once: at a new best validation, at once (the best weights are on
        disk: the end-of-run test and `eval` read them); at the run's end and on a signal;
        else every checkpoint.every_steps steps, or at each epoch's end, unless the run stops
        there (its end saves, after the last validation)."""
        if self.last_saved == self.step:
            return False
        if at in ("end", "signal") or self.best_step == self.step:
            return True
        if self.stop_reason() is not None:
            return False
        every = self.cfg.checkpoint.every_steps
        if at == "step":
            return bool(every) and self.step % every == 0
        return at == "epoch" and not every

    def save(self) -> None:
        averaged = self.averager.averaged_state() if self.rank == 0 and self.averaging else None
        self.checkpointer.save(self.step, averaged=averaged, best_step=self.best_step,
                               keep_last=self.cfg.checkpoint.keep_last)
        self.last_saved = self.step

    # ---- validation and the end of the run -----------------------------------------------

    def _validate(self) -> None:
        """Validate (the module's mode is restored after), feed NT-ASGD and the plateau
        schedule, track the best (_should_save checkpoints it at once) and the time to
        target."""
        t = self.cfg.train
        t0 = time.perf_counter()
        val = self.evaluate(self.valid_loader, self.valid_reduce)
        eval_s = time.perf_counter() - t0
        event = self.ntasgd.observe(val)
        self.schedule.observe(val)
        self.last_val_step = self.step
        improved = val < self.best_val
        if improved:
            self.best_val, self.best_step = val, self.step
        self._tick()
        fields = perplexity_fields(val, self.char_level, "valid_")
        target = t.target_bpc if self.char_level else t.target_ppl
        if target > 0 and self.target_step < 0 and next(iter(fields.values())) <= target:
            self.target_step, self.target_elapsed, self.target_tokens = \
                self.step, self.elapsed, self.tokens
            event = event or "target"
        rec = {"step": self.step, "epoch": self.epoch_f(), "valid_loss": val, **fields,
               "averaging": int(self.averaging), "valid_seconds": eval_s,
               "elapsed_s": self.elapsed, "tokens": self.tokens}
        if event:
            rec["event"] = event
        self.sink.log(rec)
        await_sweep(self.rank)  # under `dist-lm sweep`: its pruner reads this first
        best = perplexity_fields(self.best_val, self.char_level, "best_valid_")
        self.sink.set_summary(**best, best_valid_loss=self.best_val, best_step=self.best_step,
                              **self._target_fields())
        if self.rank == 0 and event in ("switch", "target"):
            what = ("switching to averaged SGD (NT-ASGD)" if event == "switch" else
                    f"target {target:g} reached ({self._target_fields()['time_to_target_s']:.0f}"
                    f" s, {self.target_tokens:,} tokens)")
            print(f"dist-lm: {what} at step {self.step}", flush=True)

    def evaluate(self, loader, reduce: bool, averaged: bool = True) -> float:
        """Mean NLL over a split; with the averaged weights once NT-ASGD averaging is on (unless
        `averaged` is False: the module's weights as they are)."""
        from ..eval.windows import evaluate_stream

        ctx = self.averager.swapped() if averaged and self.averaging else contextlib.nullcontext()
        with ctx:
            total, count = evaluate_stream(self.module, loader, reduce=reduce)
        return total / max(1, count)

    def _target_fields(self) -> dict:
        if self.target_step < 0:
            return {}
        return {"time_to_target_s": self.target_elapsed, "tokens_to_target": self.target_tokens,
                "target_step": self.target_step}

    def _finish(self) -> dict:
        """End of the run: a last validation if the run stopped between validations, a last
        checkpoint, then test perplexity of the best validation checkpoint (as the reference
        reloads its best model before testing)."""
        cfg = self.cfg
        reason = self.stop_reason()
        self._validate_and_save("end")
        best = self.best_step if self.best_step >= 0 else self.step  # < 0: validation was NaN
        with weights_of(self.module, checkpoint_dir(cfg.train.run_dir, best)):
            test = self.evaluate(self.test_loader, self.test_reduce, averaged=False)
        rec = {"step": self.step, "epoch": self.epoch_f(), "final": True, "stop": reason,
               "best_step": self.best_step, "valid_loss": self.best_val,
               **perplexity_fields(self.best_val, self.char_level, "valid_"), "test_loss": test,
               **perplexity_fields(test, self.char_level, "test_"),
               "averaging": int(self.averaging), "train_seconds": self.elapsed,
               "tokens": self.tokens, **self._target_fields()}
        if self.noise:  # issue 22: the critical batch measured, and the line when far below
            rec.update({k: v for k, v in self.noise.record().items() if k.startswith("b_noise")})
            if self.rank == 0 and self.noise.advice():
                print(f"dist-lm: {self.noise.advice()}", flush=True)
        self.sink.log(rec)
        self.sink.set_summary(**{k: v for k, v in rec.items() if k.startswith(("test_", "valid_"))})
        self.scaling_baseline.record(self.run_tps)
        return rec

    # ---- small helpers -------------------------------------------------------------------

    def progress(self) -> float:
        """The fraction of the run's bound spent: steps (max_steps) or epochs, and seconds
        (max_seconds); the largest when both bound the run (whichever ends it first)."""
        t = self.cfg.train
        if t.max_steps:  # adascale (issue 22): steps_done is its progress tau
            f = self.schedule.steps_done(self.step) / t.max_steps
        else:  # within an epoch by the estimated steps per epoch, never past its end
            f = (self.epoch + min(0.999, self.epoch_step / self.steps_per_epoch)) / max(1, t.epochs)
        if t.max_seconds:
            f = max(f, self.elapsed / t.max_seconds)
        return min(1.0, f)

    def epoch_f(self) -> float:
        return self.epoch + min(0.999, self.epoch_step / self.steps_per_epoch)

    def set_lr(self, seq_len: int) -> float:
        if self.schedule.adaptive:  # adascale (issue 22): this step's gain, 1 until measured
            self.schedule.set_gain(self.step, self.noise.gain())
        lr = (self.schedule.lr(self.step, self.progress(), self.epoch)
              * seq_len / self.cfg.train.bptt)
        self.engine.set_lr(lr)
        return lr

    def init_hidden(self):
        return [self.module.init_hidden(self.micro) for _ in range(self.accum)]

    @property
    def averaging(self) -> bool:
        return self.ntasgd.averaging and self.averager.count > 0

    def _baseline_key(self) -> str:
        return self.scaling_baseline.key()


def _to(h, device):
    if isinstance(h, torch.Tensor):
        return h.to(device)
    return type(h)(_to(x, device) for x in h)
