"""The Trainer: one training loop for the local, DDP and DeepSpeed engines.

    dist-lm train configs/cpu_smoke.toml
    torchrun --nproc_per_node 2 -m dist_lm train configs/ptb_awd_lstm.toml --dist.engine=ddp
    deepspeed --num_gpus 8 -m dist_lm train configs/wt103_qrnn_12h.toml --dist.engine=deepspeed

Order of things: config -> threads and process group -> streams -> model (same seed on every
rank) -> per-rank dropout generator -> engine -> run directory (lock; fresh, resumed or
refused) -> loop. One optimizer step (`train_step`) takes the next window of all
B = global_batch streams: this rank's b = B / W columns, split into accum = b / m column
groups of m streams (each with its own hidden state), forward/backward in turn, then one
engine step. The step's lr is schedule(step, progress, epoch) * seq_len / bptt (AWD-LSTM),
where progress is the fraction of the run's bound (seconds, steps or epochs) spent. At the
end of each epoch (or every train.eval_every_steps) the validation loss, computed with the
NT-ASGD averaged weights once averaging is on, feeds NT-ASGD and the plateau schedule; a new
best is checkpointed at once, and the end-of-run test perplexity is that checkpoint's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import time
from pathlib import Path
from typing import Callable

import torch

from .. import distributed as D
from ..config import RESOLVED, Config, load_config, to_dict
from ..data.prepared import PreparedCorpus, window_cap
from ..errors import Stopped, UserError
from ..fileio import write_text_atomic
from ..metrics.baselines import baseline_key, device_kind, read_baseline, record_baseline
from ..metrics.meter import ThroughputMeter, perplexity_fields
from ..metrics.writer import MetricsSink
from ..run.checkpointer import Checkpointer, RNGState
from ..run.directory import open_run
from ..run.files import load_tensor_file, load_weights, weights_of
from ..run.layout import AVERAGED, checkpoint_dir, find_checkpoint, list_checkpoints
from ..run.stop import StopSignals
from .engines import STEP_SKIP_ENV, build_engine
from .lockstep import await_sweep
from .noise_scale import noise_scale_for
from .optim import NTASGD, LRSchedule, ParamAverager, uses_averaging

# Fault injection for the fault tests (tests/test_faults.py): SIGKILL this process right after
# this optimizer step, and a NaN loss at the listed steps (1-based, comma-separated; a step
# listed k times fails its first k attempts); on rank DIST_LM_FAULT_RANK only when set, and
# only in torchrun's first attempt (not after its restart).
KILL_ENV = "DIST_LM_FAULT_KILL_AT_STEP"
NAN_ENV = "DIST_LM_FAULT_NAN_AT_STEPS"
FAULT_RANK_ENV = "DIST_LM_FAULT_RANK"


def train_command(config: str, resume: str | None = None, overwrite: bool = False,
                  overrides: dict | None = None) -> None:
    cfg = load_config(config, overrides)
    Trainer(cfg).fit(resume=resume, overwrite=overwrite)


def default_threads() -> None:
    """Split the cores between the processes on this node unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup_process_group(cfg: Config, device: torch.device) -> None:
    """torchrun/deepspeed set the environment; a lone DDP/DeepSpeed process gets a group of one."""
    if cfg.dist.engine != "local" and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    D.init_distributed(device, cfg.dist.backend)


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
    pass a deterministic one.
    """

    def __init__(self, cfg: Config, *, clock: Callable[[], float] = time.perf_counter):
        from ..models import build_model

        self.cfg = cfg
        self.clock = clock
        t = cfg.train
        default_threads()
        self.device = D.pick_device(t.device)
        _setup_process_group(cfg, self.device)
        self.rank, self.world = D.get_rank(), D.get_world_size()

        # batch geometry: B streams = world * accum * micro
        B = t.global_batch
        if B % self.world:
            raise UserError(f"train.global_batch={B} does not divide over {self.world} ranks; "
                            f"choose a multiple of {self.world}.")
        b = B // self.world
        self.max_seq_len = window_cap(t.bptt, t.max_seq_len)
        self.micro_cap = micro_token_cap(t.max_micro_tokens, self.device)
        self.micro = t.micro_batch or auto_micro_batch(
            b, self.max_seq_len if t.variable_bptt else t.bptt, self.micro_cap)
        if b % self.micro:
            raise UserError(f"train.micro_batch={self.micro} does not divide the {b} streams per "
                            f"rank (train.global_batch={B} over {self.world} ranks); pick a "
                            f"divisor of {b}.")
        self.accum = b // self.micro

        # data
        corpus = PreparedCorpus.open(cfg.shards_dir(), cfg.data.corpus,
                                     shard_url=cfg.data.shard_url, device=self.device)
        self.corpus_dir = corpus.dir
        self.vocab_size, self.char_level = corpus.vocab_size, corpus.char_level
        self.train_loader = corpus.loader(cfg.data.train_split, B, t.bptt,
                                          variable=t.variable_bptt, seed=t.seed,
                                          max_seq_len=t.max_seq_len, rank=self.rank,
                                          world=self.world)
        shares = {"bptt": t.bptt, "rank": self.rank, "world": self.world}
        self.valid_loader, self.valid_reduce = corpus.eval_loader(
            cfg.data.valid_split, cfg.data.eval_batch_size, **shares)
        self.test_loader, self.test_reduce = corpus.eval_loader(
            cfg.data.test_split, cfg.data.test_batch_size, **shares)
        for split_loader in (self.train_loader, self.valid_loader, self.test_loader):
            split_loader.check()  # a damaged shard stops the run before anything is written

        # model: identical parameters on every rank, then a per-rank dropout generator
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

        # optimisation state
        self.averager = ParamAverager(self.module)
        self.ntasgd = NTASGD(cfg.optim.nonmono, enabled=uses_averaging(cfg.optim) or t.finetune,
                             finetune=t.finetune)
        self.schedule = LRSchedule(cfg.schedule, cfg.optim.lr, B, cfg.optim.name)
        self.noise = noise_scale_for(cfg, module, micro=self.micro, accum=self.accum,
                                     world=self.world, device=self.device,
                                     base_batch=self.schedule.scaling.base_batch)
        L = self.train_loader.stream_len
        self.steps_per_epoch = max(1.0, (L - 1) / (t.bptt * (0.975 if t.variable_bptt else 1.0)))

        # the trainer's own state (state_dict): counters; everything else is derived
        self.step = self.epoch = self.epoch_step = self.tokens = 0
        self.elapsed = 0.0  # training seconds of the run, over every resume
        self.best_val, self.best_step, self.last_val_step = math.inf, -1, -1
        self.target_step, self.target_elapsed, self.target_tokens = -1, 0.0, 0
        self.bad_steps = 0  # non-finite steps left out, over the run
        self.bad_run = 0    # ... in a row, now
        self.signalled = 0  # the stop signal every rank agreed on (0: none)
        self._signal = 0    # the one this process received
        # the device-side skip (_device_step): steps whose outcome the host has not read yet, and
        # the run of non-finite steps counted on the device
        self.step_skip = os.environ.get(STEP_SKIP_ENV, "auto")  # auto | device | host
        self._pending: list[tuple[torch.Tensor, int, float]] = []
        self._run_dev: torch.Tensor | None = None
        self._tripped_dev: torch.Tensor | None = None
        self.hidden = None
        self.last_saved = -1
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

    # ---- helpers -------------------------------------------------------------------------

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
        (_device_step, settled every log interval)."""
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

    def init_hidden(self):
        return [self.module.init_hidden(self.micro) for _ in range(self.accum)]

    @property
    def averaging(self) -> bool:
        return self.ntasgd.averaging and self.averager.count > 0

    def evaluate(self, loader, reduce: bool, averaged: bool = True) -> float:
        """Mean NLL over a split; with the averaged weights once NT-ASGD averaging is on (unless
        `averaged` is False: the module's weights as they are)."""
        from ..eval.windows import evaluate_stream

        ctx = self._swapped() if averaged and self.averaging else contextlib.nullcontext()
        with ctx:
            total, count = evaluate_stream(self.module, loader, reduce=reduce)
        return total / max(1, count)

    @contextlib.contextmanager
    def _swapped(self):
        self.averager.swap()
        try:
            yield
        finally:
            self.averager.swap()

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

    def save(self) -> None:
        averaged = self.averager.averaged_state() if self.rank == 0 and self.averaging else None
        self.checkpointer.save(self.step, averaged=averaged, best_step=self.best_step,
                               keep_last=self.cfg.checkpoint.keep_last)
        self.last_saved = self.step

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
        return {"lr_scaling": self.schedule.scaling.as_dict(),
                "batch": {"global_batch": self.cfg.train.global_batch, "world_size": self.world,
                          "per_rank": self.micro * self.accum, "micro_batch": self.micro,
                          "accum_steps": self.accum, "micro_auto": not self.cfg.train.micro_batch,
                          "max_micro_tokens": self.micro_cap}}

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

    def _announce(self) -> None:
        """Rank 0's start-of-run lines: the lr rule and the batch geometry."""
        if self.rank != 0:
            return
        print(f"dist-lm: {self.schedule.scaling.describe()}", flush=True)
        t = self.cfg.train
        how = ("train.micro_batch" if t.micro_batch else
               f"chosen: at most {self.micro_cap:,} tokens per pass, train.max_micro_tokens"
               if self.micro_cap > 0 else "chosen: no cap, train.max_micro_tokens=-1")
        print(f"dist-lm: micro batch {self.micro} x {self.accum} accumulation step(s) x "
              f"{self.world} rank(s) = global batch {t.global_batch} ({how})", flush=True)

    # ---- the loop ------------------------------------------------------------------------

    def fit(self, resume: str | None = None, overwrite: bool = False) -> dict:
        """Train until the stop decision says so; returns the final record (valid and test of
        the best checkpoint)."""
        cfg, t = self.cfg, self.cfg.train
        resumed = self._open_run(resume, overwrite)
        self.sink = sink = MetricsSink(t.run_dir, cfg, enabled=self.rank == 0,
                                       total_steps=t.max_steps or 0, initial_step=self.step,
                                       resume_step=None if resumed is None else self.step)
        self._announce()
        if resumed is not None and self.rank == 0:
            print(f"dist-lm: resumed from {resumed} (step {self.step}, epoch {self.epoch}, "
                  f"{self.elapsed:.0f} s trained)", flush=True)
        self.meter = ThroughputMeter(self.world)
        self.baseline = self._baseline()
        self.kill_at = int(os.environ.get(KILL_ENV, "0"))
        self.nan_at = [int(x) for x in os.environ.get(NAN_ENV, "").split(",") if x.strip()]
        if (os.environ.get(FAULT_RANK_ENV, str(self.rank)) != str(self.rank)
                or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"):
            self.kill_at, self.nan_at = 0, []  # another rank's fault, or torchrun's restart
        self.run_tps: list[float] = []
        self.interval = self._new_interval()
        self._elapsed0, self._t0 = self.elapsed, self.clock()
        stops = StopSignals(self._on_signal).install()  # SIGTERM / SIGINT: stop resumably
        try:
            while self.stop_reason() is None:
                if self.hidden is None:
                    self.hidden = self.init_hidden()
                self.module.train()
                wait_t0 = time.perf_counter()
                for inputs, targets in self.train_loader:  # continues at the loader's position
                    wait = time.perf_counter() - wait_t0
                    lr, seq_len, gnorm = self.train_step(inputs, targets)
                    self._after_step(lr, seq_len, gnorm, wait)
                    if self.stop_reason() is not None:
                        break
                    wait_t0 = time.perf_counter()
                else:  # the epoch ran to its end
                    self._end_epoch()
            if self.stop_reason() in ("signal", "non-finite"):
                self._stop_early()
            return self._finish()
        finally:
            stops.restore()
            self.train_loader.close()  # a stop mid-epoch leaves shard readers (pipe:) open
            sink.close()
            if self.rank == 0:
                self.lock.release()

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
            if self.last_saved != self.step:
                self.save()
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
                if self.step + 1 in self.nan_at and j == 0:  # fault injection (tests): one
                    self.nan_at.remove(self.step + 1)  # NaN attempt per listed occurrence
                    nll = nll * float("nan")
                loss = nll + out.ar + out.tar
            self.engine.backward(loss, last=j == self.accum - 1)
            hidden[j] = detach_hidden(out.hidden)
            step_loss = step_loss + loss.detach().double() / self.accum
        if self.engine.can_skip:
            gnorm = self.engine.clip(self.cfg.optim.clip)
            if check and self._device_skip():
                return self._device_step(lr, seq_len, gnorm, step_loss, hidden)
            if self._pending:
                self._settle()
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
        self.bad_steps += 1
        self.bad_run += 1
        self.sink.log({"step": self.step, "event": "non-finite", "skipped_steps": self.bad_steps,
                       "in_a_row": self.bad_run, "seq_len": seq_len, "lr": lr})

    # ---- the device-side skip: no host sync per step ---------------------------------------
    #
    # On CUDA (DIST_LM_STEP_SKIP=device forces it anywhere, =host turns it off) a non-finite
    # step is left out on the device: the finite check stays a device tensor, the fused
    # optimizer skips its update on it (GradScaler's found_inf), the carried hidden states and
    # the interval sums select on it. The host counts every step as applied and learns which
    # were not at the next settle (_settle: one host sync, one collective on several ranks,
    # which also agrees the clock and the stop signal): every log interval, and before anything
    # that reads the counters (validation, checkpoint, stop, epoch end); it then replays the
    # pending steps as the host path would have counted and logged them. A run of more than
    # train.max_bad_steps non-finite steps trips a device flag that leaves every later step
    # out too, so the run stops at the next settle with the parameters of its last good step.
    # The lr of the steps after a left-out one, until the next settle, reads the step counter
    # as if it had been applied (it only matters for warm-up and cyclic schedules). Not used:
    # for the first steps of a stateful optimizer (device_skip_ready), while NT-ASGD averages
    # (the running mean's count is the host's), for DeepSpeed, with train.max_bad_steps = -1.

    def _device_skip(self) -> bool:
        if self.step_skip == "host" or (self.step_skip != "device"
                                         and self.device.type != "cuda"):
            return False
        return not self.ntasgd.averaging and self.engine.device_skip_ready()

    def _device_step(self, lr: float, seq_len: int, gnorm: torch.Tensor,
                     step_loss: torch.Tensor, hidden: list):
        bad = ~(torch.isfinite(gnorm) & torch.isfinite(step_loss))
        if self.world > 1:  # every rank's loss: one small all-reduce on the device, no sync
            bad = D.all_reduce_max(bad.to(torch.float32)) > 0
        if self._run_dev is None:  # the host's count is exact here (just settled)
            self._run_dev = torch.full((), float(self.bad_run), device=self.device)
            self._tripped_dev = torch.zeros((), dtype=torch.bool, device=self.device)
        self._run_dev = (self._run_dev + 1) * bad
        self._tripped_dev = self._tripped_dev | (self._run_dev > self.cfg.train.max_bad_steps)
        skip = bad | self._tripped_dev
        self.engine.apply_unless(skip)
        if self.noise:
            self.noise.update(gnorm, skip=skip)  # a left-out step is not measured
        self.hidden = _select(skip, self.hidden, hidden)
        self.interval["loss"] = self.interval["loss"] + torch.where(skip, 0.0, step_loss)
        self._pending.append((skip, seq_len, lr))
        self.step += 1  # as if applied; _settle takes back the left-out ones
        self.epoch_step += 1
        self.tokens += seq_len * self.cfg.train.global_batch
        if self.world == 1:  # the local clock and signal are the agreed ones
            self._tick(agree=False)
            self.signalled = self._signal
        return lr, seq_len, torch.where(skip, 0.0, gnorm)

    def _must_settle(self) -> bool:
        """Whether the host must read the pending steps now: a full log interval, or the step
        counter (as if every pending step was applied) reaches a log, validation, checkpoint,
        fault-injection or stop point; it passes each such point before the exact counter
        does, so none is missed."""
        if not self._pending:
            return False
        s, t, every = self.step, self.cfg.train, max(1, self.cfg.log.every_steps)
        points = (every, t.eval_every_steps, self.cfg.checkpoint.every_steps)
        return (len(self._pending) >= every or any(n and s % n == 0 for n in points)
                or (self.kill_at and s == self.kill_at) or self.stop_reason() is not None)

    def _settle(self) -> bool:
        """Read which pending steps were left out (one host sync) and bring the counters, the
        interval's step count and the non-finite log to what the host path leaves; on several
        ranks the clock and the stop signal are agreed in the same collective. Returns True when
        the latest step was left out."""
        pending, self._pending = self._pending, []
        self._run_dev = self._tripped_dev = None
        if self.world > 1:
            self._tick(agree=False)
        head = torch.tensor([self.elapsed, float(self._signal)], dtype=torch.float64,
                            device=self.device)
        buf = D.all_reduce_max(torch.cat([head, torch.stack([p[0] for p in pending]).double()]))
        vals = buf.tolist()
        if self.world > 1:
            self.elapsed, self.signalled = vals[0], int(vals[1])
        B = self.cfg.train.global_batch
        self.step -= len(pending)
        self.epoch_step -= len(pending)
        self.tokens -= sum(p[1] for p in pending) * B
        for skipped, (_, seq_len, lr) in zip(vals[2:], pending):
            if not skipped:
                self.bad_run = 0
                self.step += 1
                self.epoch_step += 1
                self.tokens += seq_len * B
                continue
            self.interval["n"] -= 1
            if self.bad_run <= self.cfg.train.max_bad_steps:  # else: left out after the trip
                self._count_skip(lr, seq_len)
        return bool(vals[-1])

    def _after_step(self, lr: float, seq_len: int, gnorm, wait: float) -> None:
        """Log, validate and checkpoint at their intervals; the SIGKILL fault injection."""
        cfg = self.cfg
        if gnorm is None:  # a left-out step: nothing to log or save
            return
        self.interval["n"] += 1
        self.interval["gnorm"] = self.interval["gnorm"] + gnorm
        self.meter.add(seq_len * cfg.train.global_batch, wait)
        self.sink.progress(1)
        if self._must_settle() and self._settle():
            return  # this step was left out on the device
        if self.step % max(1, cfg.log.every_steps) == 0:
            rec = self._interval_record(lr, seq_len)
            self.run_tps.append(rec["tokens_per_s"])
            self.sink.log(rec)
            self.sink.progress(0, loss=rec["loss"])
            self.interval = self._new_interval()
        if self.signalled:  # stopping on a signal: the checkpoint comes next, nothing slow now
            return
        if cfg.train.eval_every_steps and self.step % cfg.train.eval_every_steps == 0:
            self._validate()
            self.module.train()
        every = cfg.checkpoint.every_steps
        if every and self.step % every == 0 and self.last_saved != self.step \
                and self.stop_reason() is None:
            self.save()
        if self.kill_at and self.step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def _end_epoch(self) -> None:
        if self._pending:
            self._settle()
        self.epoch += 1
        self.epoch_step = 0
        self.hidden = None
        if not self.cfg.train.eval_every_steps:
            self._validate()
        if not self.cfg.checkpoint.every_steps and self.last_saved != self.step \
                and self.stop_reason() is None:
            self.save()

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

    def _validate(self) -> None:
        """Validate, feed NT-ASGD and the plateau schedule, track the best (checkpointed at
        once, so the best weights are on disk) and the time to target."""
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
        if improved and self.last_saved != self.step:
            self.save()

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
        if self.last_val_step != self.step:
            self._validate()
        if self.last_saved != self.step:
            self.save()
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
        self._record_baseline()
        return rec

    # ---- scaling efficiency --------------------------------------------------------------

    def _baseline_key(self) -> str:
        return baseline_key(to_dict(self.cfg)["model"], self.vocab_size, self.micro,
                            self.cfg.train.bptt, self.dtype, device_kind(self.device))

    def _baseline(self) -> float:
        """Single-device tokens/s for this model, vocabulary, micro-batch, bptt, dtype and
        device kind; only multi-rank runs use one (0: none recorded, the efficiency is left out
        with a note saying how to record one)."""
        t = self.cfg.train
        if self.world == 1:
            return 0.0
        tps = t.baseline_tokens_per_s or read_baseline(self._baseline_key())
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

    def _record_baseline(self) -> None:
        if not self.cfg.train.record_baseline or self.rank != 0:
            return
        if self.world > 1 or not self.run_tps:
            print("dist-lm: train.record_baseline needs a single-device run with at least one "
                  "logged interval; no baseline recorded", flush=True)
            return
        tps = sorted(self.run_tps)[len(self.run_tps) // 2]
        record_baseline(self._baseline_key(), tps, str(self.cfg.train.run_dir))
        print(f"dist-lm: recorded {tps:,.0f} tokens/s as the single-device baseline", flush=True)


# train.max_micro_tokens = 0: tokens per forward pass (micro batch x longest window) by device.
# Not tuned by a measurement: on CPU 16384 tokens keep one pass's fp32 logits of a 10k-word
# softmax at 655 MB (twice that with their gradient), within a laptop's memory, while every
# recipe's own batch but the character ones still runs in one pass; CUDA devices hold 4x that.
MICRO_TOKENS = {"cpu": 16384, "cuda": 65536}


def micro_token_cap(max_micro_tokens: int, device: torch.device) -> int:
    """The cap train.max_micro_tokens means on `device` (0: its default; -1: none, returned 0)."""
    if max_micro_tokens < 0:
        return 0
    return max_micro_tokens or MICRO_TOKENS.get(device.type, MICRO_TOKENS["cuda"])


def auto_micro_batch(per_rank: int, window: int, cap: int) -> int:
    """The largest divisor m of the per-rank streams with m * window <= cap tokens (at least 1:
    one stream per pass when even that exceeds the cap; all of them when cap is 0)."""
    if cap <= 0:
        return per_rank
    return max(m for m in range(1, per_rank + 1)
               if per_rank % m == 0 and (m == 1 or m * window <= cap))


def _select(skip: torch.Tensor, old, new):
    """`old` where the 0-dim bool `skip` is set, else `new`, tensor by tensor through nested
    hidden states (on the device: the hidden states a left-out step leaves as they were)."""
    if isinstance(new, torch.Tensor):
        return torch.where(skip, old.to(new.dtype), new)
    return type(new)(_select(skip, o, n) for o, n in zip(old, new))


def _to(h, device):
    if isinstance(h, torch.Tensor):
        return h.to(device)
    return type(h)(_to(x, device) for x in h)
