"""Optimizers, learning-rate schedules and NT-ASGD (non-monotonically triggered averaging).

Every piece is engine-agnostic: the Trainer asks the schedule for the step's learning rate,
writes it into the optimizer's param groups (scaled by seq_len / bptt, as AWD-LSTM does),
and keeps the NT-ASGD running average of the parameters itself, so it works unchanged
under the local, DDP and DeepSpeed engines. Each stateful piece has state_dict() /
load_state_dict() with plain values (readable by torch.load(weights_only=True)).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable

import torch

from ..config import OptimConfig, ScheduleConfig
from ..errors import UserError


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """The torch.optim optimizer named by optim.name (asgd = plain SGD plus NT-ASGD averaging).
    `fused=True` picks torch's fused kernels where torch has them (SGD, Adam, AdamW): one launch
    per step instead of one per tensor, and a non-finite step can be left out on the device
    (GradScaler's found_inf; the Trainer's device-side skip). None: the fused Adam/AdamW on
    CUDA only (what DeepSpeed's client optimizer gets)."""
    params = list(params)
    name, lr, wd = cfg.name, cfg.lr, cfg.weight_decay
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    sgd_fused = {"fused": True} if fused else {}
    fused = {"fused": True} if fused or (fused is None and on_cuda) else {}
    if name in ("sgd", "asgd"):  # NT-ASGD's ASGD(t0=0, lambd=0) steps exactly like SGD; the average is ours
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, **sgd_fused)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=wd, **sgd_fused)
    betas = tuple(cfg.betas)
    if len(betas) != 2:
        raise UserError(f"optim.betas must hold two numbers, got {cfg.betas}.")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=cfg.eps, weight_decay=wd, **fused)
    if name == "amsgrad":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=cfg.eps, weight_decay=wd,
                                amsgrad=True, **fused)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=cfg.eps, weight_decay=wd, **fused)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, eps=cfg.eps, weight_decay=wd, momentum=0.0)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=wd)
    raise UserError(f"unknown optim.name '{name}'.")  # config validation normally catches it


def uses_averaging(cfg: OptimConfig) -> bool:
    """NT-ASGD applies to plain SGD (the reference's condition `args.optimizer == 'sgd'`)."""
    return cfg.name == "asgd" or (cfg.name == "sgd" and cfg.nt_asgd)


SCALING_RULES = ("none", "linear", "sqrt", "adascale")

# adascale: the lr is multiplied by r for these optimizers, by sqrt(r) for the adaptive ones
# (Adam and the others that divide by a running gradient scale; adaptdl's rule for Adam)
ADASCALE_LINEAR = ("sgd", "asgd", "momentum")


@dataclass(frozen=True)
class LRScaling:
    """The resolved large-batch rule of one run: what `resolve_scaling` derived from the config.

    Stored in the run's config.json ("resolved") and in every checkpoint (the schedule's
    state), so a resumed run is checked against the values it started with.
    """

    rule: str            # none | linear | sqrt | adascale
    base_batch: int      # the batch the recipe's lr was tuned at
    global_batch: int    # this run's
    ratio: float         # global_batch / base_batch
    base_lr: float       # optim.lr
    peak_lr: float       # base_lr * factor(rule, ratio): what the schedule starts from
    warmup_steps: int    # linear warm-up in optimizer steps (given or derived)
    warmup_derived: bool  # True: from schedule.warmup_base_steps and the ratio
    legacy: bool = False  # schedule.scaling unset with schedule.base_batch set: the old linear rule
    gain_power: float = 0.0  # adascale: the lr is times r ** gain_power (1 SGD, 0.5 adaptive)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """The start-of-run line, e.g. 'lr 30 -> 60 for global batch 80 = 4x base 20, sqrt
        rule, warm-up 400 steps'."""
        lr = (f"lr {self.base_lr:g}" if self.peak_lr == self.base_lr
              else f"lr {self.base_lr:g} -> {self.peak_lr:g}")
        rule = {"none": "no scaling rule (schedule.scaling=none)",
                "linear": "linear rule" + (" (schedule.base_batch set, schedule.scaling unset)"
                                           if self.legacy else ""),
                "sqrt": "sqrt rule",
                "adascale": "adascale rule (lr x " + ("r" if self.gain_power == 1 else "sqrt(r)")
                            + ", r the gain measured from the noise scale, 1 until measured; "
                              "schedule on progress tau += r per step)"}[self.rule]
        n = self.warmup_steps
        warm = f"warm-up {n} step{'s' * (n != 1)}" if n > 0 else "no warm-up"
        if self.warmup_derived and self.warmup_steps > 0:
            warm += " (derived)"
        return (f"{lr} for global batch {self.global_batch} = {_ratio_text(self.ratio)} base "
                f"{self.base_batch}, {rule}, {warm}")


def _ratio_text(r: float) -> str:
    if r >= 1 or (1 / r) != round(1 / r):
        return f"{r:g}x"
    return f"1/{round(1 / r)}x"


def scaling_factor(rule: str, ratio: float) -> float:
    """lr multiplier of a rule at batch ratio r = global_batch / base_batch: none 1, linear r
    (Goyal et al. 2017), sqrt sqrt(r) (You et al. 2019; Krizhevsky 2014)."""
    if rule == "none":
        return 1.0
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    if rule == "adascale":  # its gain is measured during the run (LRSchedule.set_gain)
        return 1.0
    raise UserError(f"schedule.scaling must be one of none, linear, sqrt, adascale; "
                    f"got {rule!r}.")


def derived_warmup(rule: str, ratio: float, base_steps: int) -> int:
    """Warm-up steps for a raised lr, from W = schedule.warmup_base_steps (a warm-up length in
    optimizer steps at the base batch; docs/scaling.md):

    - no warm-up when the lr is not raised (rule none, or ratio <= 1: the recipe at its own batch
      stays the recipe);
    - linear: ceil(W / r) steps, the same *tokens* of warm-up at every batch (Goyal et al. warm
      up over a fixed 5 epochs whatever the batch);
    - sqrt: W steps, i.e. r times the tokens (You et al.'s linear-epoch gradual warm-up, LEGW:
      warm-up epochs grow linearly with the batch, so its length in steps stays the same).
    """
    if rule in ("none", "adascale") or ratio <= 1 or base_steps <= 0:  # adascale: r starts at 1
        return 0
    if rule == "linear":
        return math.ceil(base_steps / ratio - 1e-9)
    return base_steps


def resolve_scaling(cfg: ScheduleConfig, base_lr: float, global_batch: int,
                    optimizer: str = "sgd") -> LRScaling:
    """The rule, ratio, peak lr and warm-up of a run. schedule.scaling empty (unset) means the
    old behaviour: linear when schedule.base_batch > 0 (warm-up only as schedule.warmup_steps
    gives it), else none; schedule.base_batch 0 means this run's own global batch (ratio 1;
    `load_config` fills it with the config file's train.global_batch). A schedule.warmup_steps
    >= 0 is used as given; -1 derives it (`derived_warmup`). `optimizer` (optim.name) picks
    adascale's power of the gain: r for SGD, momentum and NT-ASGD, sqrt(r) otherwise."""
    legacy = not cfg.scaling and cfg.base_batch > 0
    rule = cfg.scaling or ("linear" if cfg.base_batch > 0 else "none")
    base = cfg.base_batch if cfg.base_batch > 0 else global_batch
    ratio = global_batch / base
    peak = base_lr * scaling_factor(rule, ratio)
    if cfg.warmup_steps >= 0:
        warmup, derived = cfg.warmup_steps, False
    elif legacy:
        warmup, derived = 0, False  # exactly what base_batch alone did before schedule.scaling
    else:
        warmup, derived = derived_warmup(rule, ratio, cfg.warmup_base_steps), True
    return LRScaling(rule=rule, base_batch=base, global_batch=global_batch, ratio=ratio,
                     base_lr=base_lr, peak_lr=peak, warmup_steps=warmup, warmup_derived=derived,
                     legacy=legacy,
                     gain_power=(0.0 if rule != "adascale" else
                                 1.0 if optimizer in ADASCALE_LINEAR else 0.5))


class LRSchedule:
    """Learning rate as a function of (optimizer step, progress, epochs completed).

    `progress` is the fraction of the run's bound spent, in [0, 1]: of its seconds for a run
    bounded by train.max_seconds (a time-bounded run decays by the wall clock), of its steps or
    epochs otherwise (the largest fraction when several bounds are set: whichever ends the run
    first). kinds: constant; step (multiply by gamma at each milestone: whole epochs when >= 1,
    taking effect exactly at that epoch boundary like the reference's --when; fractions of the
    run when < 1, e.g. [0.5, 0.75] = "fixed-time" decay); plateau (multiply by gamma when
    validation has not improved for more than `patience` checks); cosine (from the peak to
    min_lr over the run's progress); cyclic (triangular between min_lr and lr, `cycle_steps` per
    half cycle). The large-batch rule (`resolve_scaling`: the peak is optim.lr times 1, r or
    sqrt(r) for r = global_batch / base_batch) and the linear warm-up over its first
    warm-up steps (given, or derived from r) apply to every kind. The per-step seq_len / bptt
    factor is applied by the caller.

    adascale (Johnson et al. 2020): the caller hands each step's measured gain r to `set_gain`
    before asking for its lr; the lr is times r (sqrt(r) for adaptive optimizers), and the
    schedule reads the scale-invariant progress tau (the sum of r over the applied steps:
    `steps_done`) wherever it would read the step: warm-up, cyclic, and the caller's step-bound
    progress and stop. tau is in state_dict, so a resumed run continues bit-exactly.
    """

    def __init__(self, cfg: ScheduleConfig, base_lr: float, global_batch: int,
                 optimizer: str = "sgd"):
        self.cfg = cfg
        self.scaling = resolve_scaling(cfg, base_lr, global_batch, optimizer)
        self.adaptive = self.scaling.rule == "adascale"
        # adascale's progress: tau is the sum of the gains of the applied steps before step
        # `tau_at`; `gain` is the one set for the step attempted at `tau_at`
        self.tau, self.tau_at, self.gain = 0.0, 0, 1.0
        self.peak = self.scaling.peak_lr
        self.warmup_steps = self.scaling.warmup_steps
        self.plateau_scale = 1.0
        self.best = math.inf
        self.bad = 0

    def steps_done(self, step: int) -> float:
        """Progress in steps after `step` applied steps: `step` itself, or adascale's tau. The
        gain set for the attempt at `tau_at` counts once the step counter has passed it (the
        step was applied); a step left out keeps the counter, and tau, where they were."""
        if not self.adaptive:
            return step
        return self.tau + self.gain * (step - self.tau_at) if step > self.tau_at else self.tau

    def set_gain(self, step: int, gain: float | None) -> None:
        """adascale: the measured gain r for the step attempted after `step` applied steps (None:
        not measured yet, r = 1). Call once per attempt, before `lr`. (A step the device-side
        skip left out, known only later, still counted its gain: those are non-finite steps.)"""
        self.tau = self.steps_done(step)
        self.tau_at, self.gain = step, 1.0 if gain is None else float(gain)

    def lr(self, step: int, progress: float, epoch: int) -> float:
        """Learning rate for optimizer step `step` (0-based), `progress` of the way through the
        run, after `epoch` completed epochs."""
        if self.adaptive:  # the schedule runs on tau; the lr is times the gain's power
            return (self._lr(self.steps_done(step), progress, epoch)
                    * self.gain ** self.scaling.gain_power)
        return self._lr(step, progress, epoch)

    def _lr(self, step: float, progress: float, epoch: int) -> float:
        c = self.cfg
        progress = min(1.0, max(0.0, progress))
        lr = self.peak
        if c.kind == "step":
            for m in c.milestones:
                if (m >= 1 and epoch >= m) or (m < 1 and progress >= m):
                    lr *= c.gamma
        elif c.kind == "plateau":
            lr = max(c.min_lr, lr * self.plateau_scale)
        elif c.kind == "cosine":
            lr = c.min_lr + (lr - c.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        elif c.kind == "cyclic":
            pos = (step % (2 * c.cycle_steps)) / c.cycle_steps  # 0..2
            frac = pos if pos <= 1 else 2 - pos
            lr = c.min_lr + (lr - c.min_lr) * frac
        if self.warmup_steps > 0 and step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr

    def observe(self, val_loss: float) -> None:
        """Feed one validation loss (plateau schedule)."""
        if self.cfg.kind != "plateau":
            return
        if val_loss < self.best:
            self.best, self.bad = val_loss, 0
        else:
            self.bad += 1
            if self.bad > self.cfg.patience:
                self.plateau_scale *= self.cfg.gamma
                self.bad = 0

    def state_dict(self) -> dict:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad": self.bad,
                "scaling": self.scaling.as_dict(), "tau": self.tau, "tau_at": self.tau_at,
                "gain": self.gain}

    def load_state_dict(self, sd: dict) -> None:
        self.plateau_scale = float(sd["plateau_scale"])
        self.best = float(sd["best"])
        self.bad = int(sd["bad"])
        # adascale's progress (absent before it existed: such runs did not use it)
        self.tau, self.tau_at = float(sd.get("tau", 0.0)), int(sd.get("tau_at", 0))
        self.gain = float(sd.get("gain", 1.0))

    def check_resume(self, sd: dict, where: str) -> None:
        """Refuse to continue a checkpoint (its schedule state `sd`) whose large-batch rule, base
        batch or warm-up differ from what this run resolved (a changed default or config file
        would otherwise change the lr mid-run); names the flags that continue it as it was.
        optim.lr itself may change on resume (e.g. lowered after non-finite steps): the rule
        then applies to the new value. Checkpoints older than schedule.scaling carry no record
        and are not checked."""
        old = sd.get("scaling")
        if not old:
            return
        new = self.scaling
        diffs = [(k, old[k], getattr(new, k)) for k in ("rule", "base_batch", "warmup_steps")
                 if old.get(k) != getattr(new, k)]
        if not diffs:
            return
        what = ", ".join(f"{k} {a} (this run: {b})" for k, a, b in diffs)
        raise UserError(f"cannot resume from {where}: it was trained with {what}. Continue it as "
                        f"it started with --schedule.scaling={old['rule']} "
                        f"--schedule.base_batch={old['base_batch']} "
                        f"--schedule.warmup_steps={old['warmup_steps']}, or start a new "
                        f"train.run_dir.")


class NTASGD:
    """The non-monotone trigger of salesforce/awd-lstm-lm (main.py / finetune.py).

    After each validation (before appending it to the history):
        len(history) > nonmono and val_loss > min(history[:-nonmono])
    switches SGD to averaged SGD (training mode) or stops the run (finetune mode, which
    averages from the start).
    """

    def __init__(self, nonmono: int = 5, enabled: bool = True, finetune: bool = False):
        self.nonmono = nonmono
        self.enabled = enabled
        self.finetune = finetune
        self.history: list[float] = []
        self.averaging = enabled and finetune
        self.stop = False

    def trigger(self, val_loss: float) -> bool:
        h, n = self.history, self.nonmono
        return len(h) > n and val_loss > min(h[:-n])

    def observe(self, val_loss: float) -> str | None:
        """Record a validation loss; returns 'switch', 'stop' or None."""
        event = None
        if self.enabled:
            if self.finetune:
                if self.trigger(val_loss):
                    self.stop, event = True, "stop"
            elif not self.averaging and self.trigger(val_loss):
                self.averaging, event = True, "switch"
        self.history.append(float(val_loss))
        return event

    def state_dict(self) -> dict:
        return {"history": list(self.history), "averaging": self.averaging, "stop": self.stop}

    def load_state_dict(self, sd: dict) -> None:
        self.history = [float(v) for v in sd["history"]]
        self.averaging = bool(sd["averaging"])
        self.stop = bool(sd["stop"])


class ParamAverager:
    """Running mean of the parameters over the optimizer steps since averaging began.

    Same as torch.optim.ASGD's `ax` with t0=0, lambd=0 (the reference's optimizer): its mu
    lags one step, so steps 1 and 2 copy and step k adds (p - ax) / (k - 1), i.e. the
    mean of the parameters after steps 2..k. The mean is kept in fp32 whatever the parameter
    dtype (in bf16 one update's rounding is as large as a step's noise). Keys are the unwrapped
    model's parameter names, so `averaged.pt` loads into the same model as `model.pt`.
    Stateful: state_dict() is the count; the averaged tensors travel as averaged.pt.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.count = 0
        self.avg: dict[str, torch.Tensor] = {}
        self._live: dict[str, torch.Tensor] | None = None  # the live parameters while swapped

    def _params(self):
        return [(n, p) for n, p in self.module.named_parameters()]

    @torch.no_grad()
    def update(self) -> None:
        self.count += 1
        for name, p in self._params():
            if self.count <= 2:
                self.avg[name] = p.detach().to(torch.float32, copy=True)
            else:
                a = self.avg[name]
                a.add_(p.detach().float().sub(a).mul_(1.0 / (self.count - 1)))  # sub: .float() of
                # an fp32 parameter is the parameter itself

    def averaged_state(self) -> dict:
        """Like module.state_dict() but with averaged parameters (buffers as they are)."""
        sd = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        for name, a in self.avg.items():
            if name in sd:
                sd[name] = a.detach().clone()
        return sd

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, sd: dict) -> None:
        self.count = int(sd["count"])
        self.avg = {}

    def load_average(self, averaged_state: dict) -> None:
        """The averaged tensors of a checkpoint (averaged.pt), after load_state_dict."""
        self.avg = {n: averaged_state[n].to(p.device, torch.float32).clone()
                    for n, p in self._params() if n in averaged_state}

    def swap(self) -> None:
        """Put the average into the live parameters (the first call) and the live ones back
        (the second); used for evaluation. The average itself is never written back: in a bf16
        model the parameters hold it only rounded, and the fp32 mean must survive the round trip."""
        with torch.no_grad():
            if self._live is None:
                self._live = {}
                for name, p in self._params():
                    a = self.avg.get(name)
                    if a is not None:
                        self._live[name] = p.detach().clone()
                        p.copy_(a)
            else:
                for name, p in self._params():
                    if name in self._live:
                        p.copy_(self._live[name])
                self._live = None

    @contextlib.contextmanager
    def swapped(self):
        """The average in the live parameters inside the block, the live ones back after."""
        self.swap()
        try:
            yield
        finally:
            self.swap()
