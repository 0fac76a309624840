"""The Trainer: one training loop for the local, DDP and DeepSpeed engines.

    dist-lm train configs/cpu_smoke.toml
    torchrun --nproc_per_node 2 -m dist_lm train configs/ptb_awd_lstm.toml --dist.engine=ddp
    deepspeed --num_gpus 8 -m dist_lm train configs/wt103_qrnn_12h.toml --dist.engine=deepspeed

Order of things: config -> threads and process group -> streams -> model (same seed on every
rank) -> per-rank dropout generator -> engine -> resume -> loop. One optimizer step takes the
next window of all B = global_batch streams: this rank's b = B / W columns, split into
accum = b / m column groups of m streams (each with its own hidden state), forward/backward
in turn, then one engine step. The step's lr is schedule(step) * seq_len / bptt (AWD-LSTM).
At the end of each epoch (or every train.eval_every_steps) the validation loss, computed with
the NT-ASGD averaged weights once averaging is on, feeds NT-ASGD and the plateau schedule.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import time
from pathlib import Path
from typing import Callable

import torch

from .. import distributed as D
from ..config import Config, load_config, to_dict
from ..errors import UserError
from ..metrics import (MetricsSink, ThroughputMeter, baseline_key, perplexity_fields,
                       read_baseline, record_baseline)
from ..runs import find_checkpoint, list_checkpoints, load_tensor_file, write_run_files
from . import checkpoint as C
from .engines import build_engine
from .optim import NTASGD, LRSchedule, ParamAverager, uses_averaging

# Fault injection for the resume tests: SIGKILL this process right after this optimizer step.
KILL_ENV = "DIST_LM_FAULT_KILL_AT_STEP"


def train_command(config: str, resume: str | None = None, overrides: dict | None = None) -> None:
    cfg = load_config(config, overrides)
    Trainer(cfg).fit(resume=resume)


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


def _default_loader(corpus_dir: Path):
    from ..data.streams import StreamLoader

    def make(split, batch_size, rank, world_size, bptt, variable_bptt, seed, max_seq_len, device):
        return StreamLoader(corpus_dir, split, batch_size, rank=rank, world_size=world_size,
                            bptt=bptt, variable_bptt=variable_bptt, seed=seed,
                            max_seq_len=max_seq_len, device=device)
    return make


class Trainer:
    """Builds everything from a Config; `fit()` trains. Tests may inject the model and loaders."""

    def __init__(self, cfg: Config, *, model_fn: Callable | None = None,
                 loader_fn: Callable | None = None, vocab_size: int | None = None,
                 tokenizer_kind: str | None = None):
        self.cfg = cfg
        t = cfg.train
        default_threads()
        self.device = D.pick_device(t.device)
        _setup_process_group(cfg, self.device)
        self.rank, self.world = D.get_rank(), D.get_world_size()
        self.corpus_dir = cfg.shards_dir()

        # batch geometry: B streams = world * accum * micro
        B = t.global_batch
        if B % self.world:
            raise UserError(f"train.global_batch={B} does not divide over {self.world} ranks; "
                            f"choose a multiple of {self.world}.")
        b = B // self.world
        self.micro = t.micro_batch or b
        if b % self.micro:
            raise UserError(f"train.micro_batch={self.micro} does not divide the {b} streams per "
                            f"rank (train.global_batch={B} over {self.world} ranks); pick a "
                            f"divisor of {b}.")
        self.accum = b // self.micro
        self.max_seq_len = t.max_seq_len or t.bptt + 20

        # data
        if loader_fn is None or vocab_size is None:
            from ..data.tokenizers import load_tokenizer

            if not (self.corpus_dir / "manifest.json").is_file():
                raise UserError(f"no prepared corpus at {self.corpus_dir}; run `dist-lm prepare "
                                f"{cfg.data.corpus}` or set data.shards.")
            tok = load_tokenizer(self.corpus_dir)
            vocab_size, tokenizer_kind = tok.vocab_size, tok.kind
        self.vocab_size = vocab_size
        self.char_level = tokenizer_kind in ("char", "byte")
        self.make_loader = loader_fn or _default_loader(self.corpus_dir)
        self.train_loader = self.make_loader(cfg.data.train_split, B, self.rank, self.world, t.bptt,
                                             t.variable_bptt, t.seed, self.max_seq_len, self.device)
        self.valid_loader, self.valid_reduce = self._eval_loader(cfg.data.valid_split,
                                                                 cfg.data.eval_batch_size)

        # model: identical parameters on every rank, then a per-rank dropout generator
        torch.manual_seed(t.seed)
        if model_fn is None:
            from ..models import build_model as model_fn
        module = model_fn(cfg.model, vocab_size).to(self.device)
        if t.finetune_from:
            self._load_finetune_weights(module, t.finetune_from)
        if self.rank > 0:  # rank 0 continues the seeded generator, like the reference
            torch.manual_seed(t.seed + 1000 * self.rank)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(t.seed + 1000 * self.rank)
        self.engine = build_engine(module, cfg, self.device, self.world, self.accum, self.micro)
        self.module = self.engine.module

        # optimisation state
        self.averager = ParamAverager(self.module)
        self.ntasgd = NTASGD(cfg.optim.nonmono, enabled=uses_averaging(cfg.optim) or t.finetune,
                             finetune=t.finetune)
        spe = self.steps_per_epoch_estimate()
        total = t.max_steps or max(1, int(t.epochs * spe))
        self.total_steps = total
        self.schedule = LRSchedule(cfg.schedule, cfg.optim.lr, B, total,
                                   t.epochs if not t.max_steps else t.max_steps / spe)
        self.step = 0
        self.epoch = 0
        self.epoch_step = 0
        self.tokens = 0
        self.best_val = math.inf
        self.best_step = -1
        self.train_seconds = 0.0
        self.hidden = None
        self.last_saved = -1
        self.autocast = (self.device.type == "cuda" and t.bf16 and cfg.dist.engine != "deepspeed")

    # ---- helpers -------------------------------------------------------------------------

    def _eval_loader(self, split: str, batch: int):
        """Each rank evaluates its share of the streams when they divide, else all of them."""
        t = self.cfg.train
        if batch % self.world == 0:
            return self.make_loader(split, batch, self.rank, self.world, t.bptt, False, t.seed,
                                    0, self.device), True
        return self.make_loader(split, batch, 0, 1, t.bptt, False, t.seed, 0, self.device), False

    def _load_finetune_weights(self, module, path: str) -> None:
        ckpt = find_checkpoint(path)
        name = "averaged.pt" if (ckpt / "averaged.pt").is_file() else "model.pt"
        _load_weights(module, ckpt, name)

    def steps_per_epoch_estimate(self) -> float:
        L = getattr(self.train_loader, "stream_len", 0) or 1
        t = self.cfg.train
        mean_window = t.bptt * (0.975 if t.variable_bptt else 1.0)
        return max(1.0, (L - 1) / mean_window)

    def set_lr(self, seq_len: int) -> float:
        epoch_f = self.epoch + self.epoch_step / self.steps_per_epoch_estimate()
        lr = self.schedule.lr(self.step, epoch_f) * seq_len / self.cfg.train.bptt
        self.engine.set_lr(lr)
        return lr

    def init_hidden(self):
        return [self.module.init_hidden(self.micro) for _ in range(self.accum)]

    @property
    def averaging(self) -> bool:
        return self.ntasgd.averaging and self.averager.count > 0

    def evaluate(self, loader, reduce: bool) -> float:
        """Mean NLL over a split; with the averaged weights once NT-ASGD averaging is on."""
        from ..eval.evaluate import evaluate_stream

        avg = self.averaging
        if avg:
            self.averager.swap()
        try:
            total, count = evaluate_stream(self.module, loader, reduce=reduce)
        finally:
            if avg:
                self.averager.swap()
        return total / max(1, count)

    # ---- state ---------------------------------------------------------------------------

    def trainer_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step,
                "tokens": self.tokens, "best_val": self.best_val, "best_step": self.best_step,
                "train_seconds": self.train_seconds, "world_size": self.world,
                "global_batch": self.cfg.train.global_batch, "engine": self.cfg.dist.engine,
                "schedule": self.schedule.state_dict(), "ntasgd": self.ntasgd.state_dict(),
                "avg_count": self.averager.count}

    def save(self) -> None:
        C.save_checkpoint(
            Path(self.cfg.train.run_dir), self.step, self.rank,
            model_state=self.module.state_dict() if self.rank == 0 else None,
            averaged_state=(self.averager.state_dict() if self.rank == 0 and self.averaging
                            else None),
            trainer_state=self.trainer_state(),
            rank_state={"rng": C.rng_state(self.device), "loader": self.train_loader.state_dict(),
                        "hidden": self.hidden},
            engine=self.engine, keep_last=self.cfg.checkpoint.keep_last,
            keep={self.best_step} if self.best_step >= 0 else set())
        self.last_saved = self.step

    def resume(self, how: str | None) -> Path | None:
        if not how:
            return None
        run_dir = Path(self.cfg.train.run_dir)
        if how == "auto":
            ckpts = list_checkpoints(run_dir)
            if not ckpts:
                return None
            step_dir = ckpts[-1]
        else:
            step_dir = find_checkpoint(how)
        st = C.load_trainer_state(step_dir, self.world, self.cfg.train.global_batch)
        if st.get("engine", self.cfg.dist.engine) != self.cfg.dist.engine and \
                "deepspeed" in (st.get("engine"), self.cfg.dist.engine):
            raise UserError(f"cannot resume from {step_dir}: it was written by dist.engine="
                            f"{st['engine']}; set --dist.engine={st['engine']}.")
        _load_weights(self.module, step_dir, "model.pt")
        self.engine.load(step_dir, self.rank)
        for k in ("step", "epoch", "epoch_step", "tokens", "best_step"):
            setattr(self, k, int(st[k]))
        self.best_val = float(st["best_val"])
        self.train_seconds = float(st["train_seconds"])
        self.schedule.load_state_dict(st["schedule"])
        self.ntasgd.load_state_dict(st["ntasgd"])
        if int(st["avg_count"]) > 0:
            self.averager.load(load_tensor_file(step_dir / "averaged.pt"), int(st["avg_count"]))
        rs = C.load_rank_state(step_dir, self.rank)
        self.train_loader.load_state_dict(rs["loader"])
        self.hidden = [_to(h, self.device) for h in rs["hidden"]] if rs["hidden"] is not None else None
        C.set_rng_state(rs["rng"], self.device)  # last: nothing after this may draw random numbers
        self.last_saved = self.step
        return step_dir

    # ---- the loop ------------------------------------------------------------------------

    def fit(self, resume: str | None = None) -> dict:
        from ..models import detach_hidden

        cfg, t = self.cfg, self.cfg.train
        run_dir = Path(t.run_dir)
        if self.rank == 0:
            write_run_files(run_dir, cfg, self.corpus_dir)
        D.barrier()
        resumed = self.resume(resume)
        sink = MetricsSink(run_dir, cfg, enabled=self.rank == 0, total_steps=self.total_steps,
                           initial_step=self.step)
        if resumed is not None and self.rank == 0:
            print(f"dist-lm: resumed from {resumed} (step {self.step}, epoch {self.epoch})", flush=True)
        meter = ThroughputMeter(self.world)
        key = baseline_key(to_dict(cfg)["model"], self.micro, t.bptt, self.device.type)
        baseline = t.baseline_tokens_per_s or read_baseline(key)
        kill_at = int(os.environ.get(KILL_ENV, "0"))
        log_every = max(1, cfg.log.every_steps)
        run_tps: list[float] = []
        interval = self._new_interval()
        self.started = time.perf_counter() - self.train_seconds
        B = t.global_batch

        def finished() -> bool:
            if t.max_steps and self.step >= t.max_steps:
                return True
            if t.max_seconds and time.perf_counter() - self.started >= t.max_seconds:
                return True
            return False

        done = finished() or self.ntasgd.stop  # e.g. resuming a run that already finished
        while not done and (t.max_steps or self.epoch < t.epochs):
            if self.epoch_step == 0 or self.hidden is None:
                self.hidden = self.init_hidden()
            self.module.train()
            it = iter(self.train_loader)
            wait_t0 = time.perf_counter()
            for inputs, targets in it:
                wait = time.perf_counter() - wait_t0
                seq_len = inputs.shape[0]
                lr = self.set_lr(seq_len)
                for j in range(self.accum):
                    cols = slice(j * self.micro, (j + 1) * self.micro)
                    with torch.autocast("cuda", torch.bfloat16, enabled=self.autocast):
                        out = self.engine.model(inputs[:, cols], self.hidden[j], targets[:, cols])
                        nll = out.nll.float().mean()
                        loss = nll + out.ar + out.tar
                    self.engine.backward(loss, last=j == self.accum - 1)
                    self.hidden[j] = detach_hidden(out.hidden)
                    interval["loss"] = interval["loss"] + nll.detach().double() / self.accum
                gnorm = self.engine.step(cfg.optim.clip)
                if self.ntasgd.averaging:
                    self.averager.update()
                self.step += 1
                self.epoch_step += 1
                self.tokens += seq_len * B
                interval["n"] += 1
                interval["gnorm"] = interval["gnorm"] + gnorm
                meter.add(seq_len * B, wait)
                sink.progress(1, loss=lambda: float(interval["loss"]) / interval["n"])
                if self.step % log_every == 0:
                    rec = self._interval_record(interval, meter, lr, seq_len, baseline)
                    run_tps.append(rec["tokens_per_s"])
                    sink.log(rec)
                    interval = self._new_interval()
                if t.eval_every_steps and self.step % t.eval_every_steps == 0:
                    done = self._after_validation(sink) or done
                    self.module.train()
                stop = finished() or done
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0 \
                        and not stop:
                    self.save()
                if kill_at and self.step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop:
                    done = True
                    break
                wait_t0 = time.perf_counter()
            else:  # the epoch ran to its end
                self.epoch += 1
                self.epoch_step = 0
                self.hidden = None
                if not t.eval_every_steps:
                    done = self._after_validation(sink) or done
                done = done or finished()
                if not cfg.checkpoint.every_steps and not done:
                    self.save()
        self.train_seconds = time.perf_counter() - self.started
        close = getattr(self.train_loader, "close", None)
        if close is not None:  # a stop mid-epoch would leave shard readers (pipe: commands) open
            close()
        if self.last_saved != self.step:
            self.save()
        result = self._final(sink, run_tps, key)
        sink.close()
        return result

    def _new_interval(self) -> dict:
        """Sums over one log interval; loss and grad norm stay on the device (no host sync per
        step) until the interval is logged."""
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        return {"loss": zero, "n": 0, "gnorm": zero}

    def _interval_record(self, interval, meter, lr, seq_len, baseline) -> dict:
        # on the device: NCCL reduces CUDA tensors only
        buf = torch.stack([interval["loss"], torch.tensor(float(interval["n"]), dtype=torch.float64,
                                                          device=self.device)])
        D.all_reduce_sum(buf)  # the mean loss over every rank's streams
        loss = float(buf[0] / buf[1])
        rec = {"step": self.step, "epoch": self.epoch + self.epoch_step /
               self.steps_per_epoch_estimate(), "loss": loss,
               **perplexity_fields(loss, self.char_level), "lr": lr, "seq_len": seq_len,
               "grad_norm": float(interval["gnorm"]) / max(1, interval["n"]),
               "averaging": int(self.averaging), "tokens": self.tokens, **meter.snapshot()}
        if baseline > 0:
            rec["scaling_efficiency"] = rec["tokens_per_s"] / (baseline * self.world)
        return rec

    def _after_validation(self, sink) -> bool:
        """Validate, feed NT-ASGD and the plateau schedule, track the best; True = stop."""
        t0 = time.perf_counter()
        val = self.evaluate(self.valid_loader, self.valid_reduce)
        eval_s = time.perf_counter() - t0
        event = self.ntasgd.observe(val)
        self.schedule.observe(val)
        if val < self.best_val:
            self.best_val, self.best_step = val, self.step
        rec = {"step": self.step, "epoch": self.epoch, "valid_loss": val,
               **perplexity_fields(val, self.char_level, "valid_"),
               "averaging": int(self.averaging), "valid_seconds": eval_s,
               "elapsed_s": time.perf_counter() - self.started, "tokens": self.tokens}
        if event:
            rec["event"] = event
        sink.log(rec)
        best = perplexity_fields(self.best_val, self.char_level, "best_valid_")
        sink.set_summary(**best, best_valid_loss=self.best_val)
        if event == "switch" and self.rank == 0:
            print(f"dist-lm: switching to averaged SGD (NT-ASGD) at step {self.step}", flush=True)
        return event == "stop"

    def _final(self, sink, run_tps: list[float], key: str) -> dict:
        cfg = self.cfg
        val = self.evaluate(self.valid_loader, self.valid_reduce)
        test_loader, reduce = self._eval_loader(cfg.data.test_split, cfg.data.test_batch_size)
        test = self.evaluate(test_loader, reduce)
        rec = {"step": self.step, "epoch": self.epoch, "final": True, "valid_loss": val,
               **perplexity_fields(val, self.char_level, "valid_"), "test_loss": test,
               **perplexity_fields(test, self.char_level, "test_"),
               "averaging": int(self.averaging), "train_seconds": self.train_seconds}
        sink.log(rec)
        sink.set_summary(**{k: v for k, v in rec.items() if k.startswith(("test_", "valid_"))})
        if self.world == 1 and run_tps and self.rank == 0 and cfg.dist.engine == "local":
            record_baseline(key, sorted(run_tps)[len(run_tps) // 2], str(cfg.train.run_dir))
        return rec


def _load_weights(module, step_dir: Path, name: str) -> None:
    """Load step_dir/name into module; a config mismatch is a UserError (resume and finetune)."""
    try:
        module.load_state_dict(load_tensor_file(step_dir / name))
    except RuntimeError as exc:
        raise UserError(f"checkpoint {step_dir} does not fit this model config: "
                        f"{str(exc).splitlines()[0]}") from None


def _to(h, device):
    if isinstance(h, torch.Tensor):
        return h.to(device)
    return type(h)(_to(x, device) for x in h)
