"""The evaluation read: one pass over a loader's windows with the hidden state carried."""

from __future__ import annotations

from contextlib import contextmanager

import torch


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
