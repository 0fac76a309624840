"""The gradient noise scale B_noise = tr(Σ) / |G|², measured during training.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", App. A.1): with two
gradient estimates of one step at batch sizes b < B (in streams), E|g_b|² = |G|² + tr(Σ)/b, so

    |G|²  ≈ (B |g_B|² − b |g_b|²) / (B − b)        tr(Σ) ≈ (|g_b|² − |g_B|²) / (1/b − 1/B)

are unbiased; each is smoothed by a bias-corrected exponential moving average and B_noise is the
ratio of the averages. Here b is one micro batch (train.micro_batch streams): a hook on every
parameter takes the squared norm of each micro batch's gradient as backward delivers it (before
it is added to .grad, and before DDP's all-reduce), |g_b|² is their mean over every micro batch
of every rank (one scalar all-reduce per measured step under DDP); g_B is the step's gradient
over all B = train.global_batch streams, whose norm the engine's clip already computed (before
clipping). So a step needs at least two micro batches: accumulation >= 2, or several ranks.

The AdaScale gain at batch B for a recipe tuned at batch B0 (Johnson et al. 2020) is
r = (1 + B_noise/B0) / (1 + B_noise/B): what a later lr rule reads (`gain()`), logged for now.

    noise = NoiseScale(module, micro=m, accum=a, world=W, global_batch=B, base_batch=B0,
                       bptt=T, every=1, device=dev)
    noise.begin(step); ...backward of every micro batch...; noise.update(grad_norm)
    noise.record()  # {"b_noise": ..., "b_noise_tokens": ..., "adascale_gain": ...}
"""

from __future__ import annotations

import math

import torch

from .. import distributed as D
from ..errors import UserError

DECAY = 0.99  # EMA decay per measured step: about the last 100 measurements


class NoiseScale:
    """Measures B_noise from micro-batch and step gradient norms; a Stateful piece (its EMAs
    are in the checkpoint, so a resumed run logs exactly what an uninterrupted one does)."""

    def __init__(self, module: torch.nn.Module, *, micro: int, accum: int, world: int,
                 global_batch: int, base_batch: int, bptt: int, every: int,
                 device: torch.device, decay: float = DECAY):
        if accum * world < 2:
            raise ValueError("the noise scale needs at least two micro batches per step")
        self.small, self.big = micro, global_batch
        self.accum, self.world = accum, world
        self.base_batch, self.bptt, self.every, self.decay = base_batch, bptt, every, decay
        self.device = device
        self.active = False
        self._norms: list[torch.Tensor] = []
        # EMAs (not yet divided by the bias correction `weight` = 1 - decay^n) of the unbiased
        # |G|² and tr(Σ) estimates, float64 on the device: no host sync per step
        self.ema = torch.zeros(3, dtype=torch.float64, device=device)  # |G|², tr(Σ), weight
        self._hooks = [p.register_hook(self._hook) for p in module.parameters()
                       if p.requires_grad]

    def _hook(self, grad: torch.Tensor) -> None:
        if self.active:  # leaves the gradient as it is (returns None)
            self._norms.append(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32))

    def begin(self, step: int) -> None:
        """Before optimizer step `step` (0-based): measure it when it is one of every `every`;
        drops what a step left out (non-finite) had collected."""
        self._norms = []
        self.active = (step + 1) % self.every == 0

    def update(self, grad_norm: torch.Tensor | float,
               skip: torch.Tensor | None = None) -> None:
        """After the step's gradient is whole (all-reduced; `grad_norm` its norm before
        clipping): one unbiased estimate of |G|² and tr(Σ) into the EMAs. Every rank calls it
        (a collective under DDP when measuring). `skip`: a device flag of a step left out on the
        device (the Trainer's device-side skip), which then leaves the EMAs alone, no sync."""
        if not self.active:
            return
        self.active = False
        local = (torch.stack(self._norms).double().square().sum() if self._norms
                 else torch.zeros((), dtype=torch.float64, device=self.device))
        self._norms = []
        # each micro batch's loss was scaled by 1/accum before backward: undo it, then mean over
        # the accum * world micro batches
        small_sq = D.all_reduce_sum(local * self.accum).div_(self.world)
        big_sq = torch.as_tensor(grad_norm, device=self.device).double().square()
        b, B = self.small, self.big
        g2 = (B * big_sq - b * small_sq) / (B - b)
        tr = (small_sq - big_sq) / (1.0 / b - 1.0 / B)
        new = torch.stack([g2, tr, torch.ones((), dtype=torch.float64, device=self.device)])
        blended = self.ema * self.decay + new * (1.0 - self.decay)
        # a non-finite step (kept only when train.max_bad_steps = -1) leaves the EMAs alone
        keep = torch.isfinite(new).all()
        if skip is not None:
            keep = keep & ~skip
        self.ema = torch.where(keep, blended, self.ema)

    # ---- what is read --------------------------------------------------------------------

    def estimates(self) -> tuple[float, float] | None:
        """The smoothed (|G|², tr(Σ)), or None before the first measurement."""
        g2, tr, weight = self.ema.tolist()
        if weight <= 0:
            return None
        return g2 / weight, tr / weight

    def measured(self) -> int:
        """How many steps the EMAs hold (from the bias correction's weight 1 - decay^n)."""
        weight = float(self.ema[2])
        return 0 if weight <= 0 else round(math.log1p(-min(weight, 1 - 1e-15))
                                           / math.log(self.decay))

    def b_noise(self) -> float | None:
        """B_noise in streams; None when undefined (nothing measured yet, or the |G|² or tr(Σ)
        estimate not positive: the noise still hides the gradient)."""
        est = self.estimates()
        if est is None or est[0] <= 0 or est[1] <= 0:
            return None
        return est[1] / est[0]

    def gain(self, batch: int | None = None) -> float | None:
        """AdaScale's gain r = (1 + B_noise/B0) / (1 + B_noise/batch) at `batch` streams (this
        run's global batch by default) over the recipe's base batch B0; None when B_noise is."""
        bn = self.b_noise()
        if bn is None:
            return None
        return (1.0 + bn / self.base_batch) / (1.0 + bn / (batch or self.big))

    def record(self) -> dict:
        """The log fields: b_noise (streams), b_noise_tokens (streams x bptt), adascale_gain;
        empty while B_noise is undefined."""
        bn = self.b_noise()
        if bn is None or not math.isfinite(bn):
            return {}
        return {"b_noise": bn, "b_noise_tokens": bn * self.bptt, "adascale_gain": self.gain()}

    def advice(self) -> str | None:
        """The line for a global batch far (> FAR times) above the measured critical batch, or
        None (not measured, or not that far): `critical_batch_advice`."""
        bn = self.b_noise()
        return None if bn is None else critical_batch_advice(self.big, bn)

    # ---- Stateful ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"ema": self.ema.cpu()}

    def load_state_dict(self, sd: dict) -> None:
        """An empty dict (a checkpoint written before the noise scale was measured) starts the
        EMAs afresh."""
        self.ema = (sd["ema"].to(self.device, torch.float64) if "ema" in sd
                    else torch.zeros(3, dtype=torch.float64, device=self.device))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


FAR = 4.0  # a global batch more than this many times B_noise gets the advice line
ADVICE_AFTER = 100  # measured steps before the advice line is printed during the run (EMA span)


def critical_batch_advice(batch: int, b_noise: float) -> str | None:
    """What a batch of `batch` streams costs next to the critical batch B_noise, from McCandlish
    et al.'s model (steps S = S_min (1 + B_noise/B), examples E = E_min (1 + B/B_noise)), when
    batch > FAR x B_noise; else None."""
    if not (math.isfinite(b_noise) and b_noise > 0) or batch <= FAR * b_noise:
        return None
    ratio = batch / b_noise
    crit = f"{b_noise:.0f}" if b_noise >= 10 else f"{b_noise:.2g}"
    tokens = (1.0 + ratio) / 2.0  # E(batch) / E(B_noise)
    steps = (1.0 + 1.0 / ratio) / 2.0  # S(batch) / S(B_noise)
    return (f"global batch {batch} streams is {ratio:.1f}x the measured critical batch "
            f"{crit} (B_noise): expect about {tokens:.1f}x the tokens of batch "
            f"{crit} for the same loss, in {steps:.2f}x its steps (McCandlish et al. "
            f"2018); a smaller batch wastes fewer tokens, docs/scaling.md")


def mask_noise_note(cfg) -> str | None:
    """What adascale should say when the model draws a dropout mask per forward pass rather than
    per stream (weight drop, embedding dropout): each micro batch's gradient then carries its
    own mask's noise, which more streams per micro batch do not shrink, so tr(Σ), B_noise and
    the gain read higher at a larger micro batch (docs/scaling.md, measured)."""
    m = cfg.model
    per_pass = [f"model.{k}={getattr(m, k):g}" for k in ("wdrop", "dropoute")
                if getattr(m, k, 0) > 0]
    if not per_pass:
        return None
    return (f"{' and '.join(per_pass)} draw one mask per micro batch, not per stream: the noise "
            f"scale counts that mask noise too, so B_noise and the adascale gain read higher "
            f"at a larger train.micro_batch (docs/scaling.md, 'Measured')")


def noise_scale_for(cfg, module: torch.nn.Module, *, micro: int, accum: int, world: int,
                    base_batch: int, device: torch.device) -> NoiseScale | None:
    """The run's NoiseScale, or None when train.noise_scale_every leaves it off: -1 (auto)
    measures every step when a step has at least two micro batches (accumulation or ranks) on
    the local or DDP engine (config.validate refuses an explicit N on DeepSpeed)."""
    t, micro_batches = cfg.train, accum * world
    every = t.noise_scale_every
    if every < 0:
        every = 1 if micro_batches >= 2 and cfg.dist.engine != "deepspeed" else 0
    if cfg.schedule.scaling == "adascale" and micro_batches < 2:  # its gain needs the estimate
        raise UserError(f"schedule.scaling=adascale needs the gradient noise scale, measured from "
                        f"two or more micro batches per step, and this run has one "
                        f"({t.global_batch} streams on 1 rank in one pass); set "
                        f"--train.micro_batch to a divisor of {t.global_batch} below it, run on "
                        f"several ranks, or pick another --schedule.scaling.")
    if every and micro_batches < 2:
        raise UserError(f"train.noise_scale_every={every} needs two micro batches per step and "
                        f"this run has one ({t.global_batch} streams on 1 rank in one pass); set "
                        f"--train.micro_batch to a divisor of {t.global_batch} below it, run on "
                        f"several ranks, or set --train.noise_scale_every=0.")
    if not every:
        return None
    return NoiseScale(module, micro=micro, accum=accum, world=world, global_batch=t.global_batch,
                      base_batch=base_batch, bptt=t.bptt, every=every, device=device)
