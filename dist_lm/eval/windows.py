"""The evaluation read: one pass over a loader's windows with the hidden state carried, and the
sum of NLL over it (what the Trainer's validation and `dist-lm eval` both use)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..distributed import all_reduce_sum


@contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode for the block; its previous train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def carried_outputs(model: torch.nn.Module, loader):
    """(model output, targets) per window, the hidden state starting at zero and carried
    (detached) from window to window. Runs under the caller's grad mode."""
    from ..models import detach_hidden

    hidden = None
    for inputs, targets in loader:
        if hidden is None:
            hidden = model.init_hidden(inputs.shape[1])
        out = model(inputs, hidden, targets)
        hidden = detach_hidden(out.hidden)
        yield out, targets


def _sum_over_windows(model, loader, window_nll, reduce: bool) -> tuple[float, int]:
    """Sum window_nll(out, targets) over the loader in eval mode (the mode is restored after),
    with the sums kept on the device; all-reduced over ranks with `reduce`."""
    total, count = None, 0
    with eval_mode(model):
        for out, targets in carried_outputs(model, loader):
            s = window_nll(out, targets)
            total = s if total is None else total + s  # no host sync per window
            count += targets.numel()
    # on the model's device: NCCL reduces CUDA tensors only (also when this rank had no window)
    device = total.device if total is not None else next(model.parameters()).device
    buf = torch.tensor([0.0 if total is None else float(total), float(count)],
                       dtype=torch.float64, device=device)
    if reduce:
        all_reduce_sum(buf)
    return float(buf[0]), int(round(float(buf[1])))


@torch.no_grad()
def evaluate_stream(model: torch.nn.Module, loader, reduce: bool = True) -> tuple[float, int]:
    """Sum of NLL and number of predicted tokens over one pass of `loader`.

    The hidden state starts at zero and is carried across windows (AWD-LSTM's protocol).
    The model is put in eval mode for the pass and restored to its previous mode after, so
    the trainer can call this for validation. With `reduce` and an initialized process
    group, both numbers are summed over ranks (each rank holds its own streams).
    """
    return _sum_over_windows(model, loader, lambda out, t: out.nll.double().sum(), reduce)
