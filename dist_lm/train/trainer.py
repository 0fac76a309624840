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
baseline of the scaling efficiency), runlog (what the run writes: the interval, validation and
final records, the summary, the start-of-run lines), agree (the clock, a signal and a bad
step agreed over ranks), rundir (the checkpointer's pieces, opening the run directory, the
"resolved" block), engines, optim.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from typing import Callable

import torch

from .. import distributed as D
from ..config import Config, load_config
from ..data.prepared import PreparedCorpus
from ..errors import Stopped, UserError
from ..metrics.meter import perplexity_fields
from ..run.files import load_weights, weights_of
from ..run.layout import checkpoint_dir, find_checkpoint, list_checkpoints
from ..run.stop import StopSignals
from .agree import Agreement
from .baseline import ScalingBaseline
from .device_skip import DeviceSkip
from .engines import STEP_SKIP_ENV, build_engine
from .faults import Faults
from .geometry import BatchGeometry
from .noise_scale import noise_scale_for
from .optim import NTASGD, LRSchedule, ParamAverager, uses_averaging
from .rundir import open_trainer_run, trainer_checkpointer
from .runlog import RunLog


def train_command(config: str, resume: str | None = None, overwrite: bool = False,
                  overrides: dict | None = None) -> None:
    cfg = load_config(config, overrides)
    Trainer(cfg).fit(resume=resume, overwrite=overwrite)


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
        self.checkpointer = trainer_checkpointer(self)  # every stateful piece of the run

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
        self.agree = Agreement(self)  # the clock, a signal and a bad step, agreed over ranks
        self.hidden = None
        self.last_saved = -1

    # ---- state ---------------------------------------------------------------------------

    _COUNTERS = ("step", "epoch", "epoch_step", "tokens", "best_step", "last_val_step",
                 "target_step", "target_tokens", "bad_steps", "bad_run")

    def state_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self._COUNTERS}, "elapsed": self.elapsed,
                "best_val": self.best_val, "target_elapsed": self.target_elapsed,
                "micro_batch": self.micro}  # checked on resume (rundir.check_resume), not loaded

    def load_state_dict(self, sd: dict) -> None:
        for k in self._COUNTERS:
            setattr(self, k, int(sd[k]))
        for k in ("elapsed", "best_val", "target_elapsed"):
            setattr(self, k, float(sd[k]))

    # ---- the loop ------------------------------------------------------------------------

    def fit(self, resume: str | None = None, overwrite: bool = False) -> dict:
        """Open the run (fresh or resumed), train epoch after epoch until the stop decision
        says so, finish; returns the final record (valid and test of the best checkpoint)."""
        resumed = open_trainer_run(self, resume, overwrite)  # fresh (None), resumed or refused
        self.runlog = RunLog(self, resumed)  # announces the run
        self.sink = self.runlog.sink
        self.agree.start()  # the run's clock, agreed over ranks at every step
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
            self.runlog.close()
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
            if self.agree.step(bad):
                return self._skip_step(lr, seq_len)
            self.engine.apply()
            if self.noise:
                self.noise.update(gnorm)  # the unclipped norm (clip returns it)
        else:  # DeepSpeed steps as one: a non-finite loss is caught before it, and stops the run
            if self.agree.step(~torch.isfinite(step_loss) if check else None):
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
        self.runlog.skipped(lr, seq_len)

    # ---- after a step: log, validate, save -----------------------------------------------

    def _after_step(self, lr: float, seq_len: int, gnorm, wait: float) -> None:
        """Log at its interval; validate and checkpoint when due; the SIGKILL fault injection."""
        cfg = self.cfg
        if gnorm is None:  # a left-out step: nothing to log or save
            return
        self.runlog.add_step(seq_len, gnorm, wait)
        if self.device_skip.must_settle() and self.device_skip.settle():
            return  # this step was left out on the device
        if self.step % max(1, cfg.log.every_steps) == 0:
            self.runlog.write_interval(lr, seq_len)
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
        self.agree.tick()
        fields = perplexity_fields(val, self.char_level, "valid_")
        target = t.target_bpc if self.char_level else t.target_ppl
        if target > 0 and self.target_step < 0 and next(iter(fields.values())) <= target:
            self.target_step, self.target_elapsed, self.target_tokens = \
                self.step, self.elapsed, self.tokens
            event = event or "target"
        self.runlog.validation(val, fields, eval_s, event, target)

    def evaluate(self, loader, reduce: bool, averaged: bool = True) -> float:
        """Mean NLL over a split; with the averaged weights once NT-ASGD averaging is on (unless
        `averaged` is False: the module's weights as they are)."""
        from ..eval.windows import evaluate_stream

        ctx = self.averager.swapped() if averaged and self.averaging else contextlib.nullcontext()
        with ctx:
            total, count = evaluate_stream(self.module, loader, reduce=reduce)
        return total / max(1, count)

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
        return self.runlog.final(reason, test)

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
    def interval(self) -> dict:
        return self.runlog.interval  # the current log interval's sums (runlog.RunLog)

    @property
    def averaging(self) -> bool:
        return self.ntasgd.averaging and self.averager.count > 0

    def _baseline_key(self) -> str:
        return self.scaling_baseline.key()

