"""Dynamic evaluation (Krause et al. 2018, "Dynamic Evaluation of Neural Sequence Models"),
the RMS-normalised variant with decay towards the trained weights (benkrause/dynamic-evaluation).

1. Gradient statistics on the training split (`stat_batch` streams, segments of `bptt`
   tokens, model in eval mode): MS_p = sqrt(mean over batches of g_p^2) per parameter p.
   Decay rates: decrate_p = MS_p / mean_p(mean(MS_p)), clipped at 1/decay.
2. The evaluation stream is read in segments of `bptt` tokens (batch 1, hidden carried).
   Each segment is scored with the current weights, then its mean loss is backpropagated
   and every parameter moves

       theta <- theta - lr * g / (MS + eps) + decay * decrate * (theta0 - theta)

   so the model adapts to the recent history and is pulled back to the trained theta0.

Everything happens on a deep copy of the model: the caller's model and the checkpoint files
are never modified. With lr = 0 the weights never move, which is plain evaluation.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from .windows import carried_outputs

# Krause et al.'s search grid for segments of 5 tokens; scaled by bptt / 5 for other lengths
SEARCH_LRS = (3e-5, 4e-5, 5e-5, 6e-5, 7e-5, 1e-4)
SEARCH_DECAYS = (0.001, 0.002, 0.003, 0.005)


def _backward_ok(device: torch.device):
    """cuDNN's RNN refuses backward in eval mode; the native kernels do it fine."""
    if device.type == "cuda":
        return torch.backends.cudnn.flags(enabled=False)
    return contextlib.nullcontext()


class DynamicEvaluator:
    """Holds an adapted copy of `model`, its trained weights theta0 and the gradient statistics.

        dyn = DynamicEvaluator(model)
        dyn.collect_stats(train_loader, max_batches=0)
        sum_nll, n = dyn.evaluate(loader, lr=5e-5, decay=2e-3)   # starts from theta0 each time
    """

    def __init__(self, model: torch.nn.Module):
        self.model = copy.deepcopy(model)
        self.model.eval()
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.theta0 = {n: p.detach().clone() for n, p in self.params.items()}
        self.ms: dict[str, torch.Tensor] | None = None
        self.decrate: dict[str, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def _windows(self, loader):
        """Per window: forward (hidden carried), then backward of the mean loss; yields
        (output, targets) with the gradients in place."""
        for out, targets in carried_outputs(self.model, loader):
            self.model.zero_grad(set_to_none=True)
            out.nll.mean().backward()
            yield out, targets

    def reset(self) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.theta0[n])

    def collect_stats(self, loader, max_batches: int = 0) -> int:
        """RMS gradients over (at most `max_batches`, 0 = all) windows of `loader`."""
        self.reset()
        sq = {n: torch.zeros_like(p) for n, p in self.params.items()}
        batches = 0
        with torch.enable_grad(), _backward_ok(self.device):
            for out, _ in self._windows(loader):
                for n, p in self.params.items():
                    if p.grad is not None:
                        sq[n] += p.grad.detach() ** 2
                batches += 1
                if max_batches and batches >= max_batches:
                    break
        self.model.zero_grad(set_to_none=True)
        if batches == 0:
            raise ValueError("no training windows for the gradient statistics")
        self.ms = {n: torch.sqrt(s / batches) for n, s in sq.items()}
        gsum = torch.stack([m.mean() for m in self.ms.values()]).mean()
        self.decrate = {n: m / gsum for n, m in self.ms.items()}
        return batches

    def evaluate(self, loader, lr: float, decay: float, eps: float = 2e-5,
                 max_tokens: int = 0) -> tuple[float, int]:
        """Sum of NLL and predicted tokens over `loader`, adapting after every window.

        Starts from theta0; stops after `max_tokens` predicted tokens when > 0.
        """
        if self.ms is None:
            raise RuntimeError("collect_stats must run before evaluate")
        self.reset()
        names = list(self.params)
        params = [self.params[n] for n in names]
        theta0 = [self.theta0[n] for n in names]
        # per-parameter constants of the update, computed once: decay * rate and lr / (MS + eps)
        pull = [decay * (self.decrate[n].clamp(max=1.0 / decay) if decay > 0 else self.decrate[n])
                for n in names]
        keep = [1.0 - a for a in pull]
        step_size = [lr / (self.ms[n] + eps) for n in names]
        # the state is delta = theta - theta0: delta <- (1 - pull) * delta - step_size * g and
        # theta = theta0 + delta (three passes over the weights; delta stays 0 when lr = 0)
        delta = [torch.zeros_like(p) for p in params]
        total = 0.0
        count = 0
        with torch.enable_grad(), _backward_ok(self.device):
            for out, targets in self._windows(loader):
                total += float(out.nll.detach().double().sum())  # scored before adapting
                count += targets.numel()
                with torch.no_grad():
                    if lr:
                        torch._foreach_mul_(delta, keep)
                        has = [i for i, p in enumerate(params) if p.grad is not None]
                        torch._foreach_addcmul_([delta[i] for i in has],
                                                [params[i].grad for i in has],
                                                [step_size[i] for i in has], value=-1.0)
                        for p, t0, d in zip(params, theta0, delta):
                            torch.add(t0, d, out=p)
                if max_tokens and count >= max_tokens:
                    break
        self.model.zero_grad(set_to_none=True)
        return total, count
