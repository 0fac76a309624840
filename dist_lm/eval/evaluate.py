"""Evaluation: perplexity / bits per character of a run on a split.

The reference protocol is AWD-LSTM's (salesforce/awd-lstm-lm main.py `evaluate`): the split
is cut into B contiguous streams (10 for valid, 1 for test), read in fixed bptt windows with
the hidden state carried from window to window. The reference returns
`sum_w len(window) * mean_nll(window) / len(data_source)`; every window holds T*B tokens, so
that is `sum_nll / (B * L)`, i.e. the sum of NLL over every predicted token divided by the
number of predicted tokens -- but its `len(data_source)` counts L rows while only L-1 are
predicted, a 1/L bias. We report exactly `sum NLL / number of predicted tokens`.

    from dist_lm.eval.evaluate import evaluate_stream
    sum_nll, n_tokens = evaluate_stream(model, loader)    # all-reduced over ranks
"""

from __future__ import annotations

import math

import torch

from ..distributed import all_reduce_sum


@torch.no_grad()
def evaluate_stream(model: torch.nn.Module, loader, reduce: bool = True) -> tuple[float, int]:
    """Sum of NLL and number of predicted tokens over one pass of `loader`.

    The hidden state starts at zero and is carried across windows (AWD-LSTM's protocol).
    The model is put in eval mode for the pass and restored to its previous mode after, so
    the trainer can call this for validation. With `reduce` and an initialized process
    group, both numbers are summed over ranks (each rank holds its own streams).
    """
    from ..models import detach_hidden

    was_training = model.training
    model.eval()
    total = None
    count = 0
    hidden = None
    try:
        for inputs, targets in loader:
            if hidden is None:
                hidden = model.init_hidden(inputs.shape[1])
            out = model(inputs, hidden, targets)
            hidden = detach_hidden(out.hidden)
            s = out.nll.double().sum()
            total = s if total is None else total + s
            count += targets.numel()
    finally:
        model.train(was_training)
    device = total.device if total is not None else torch.device("cpu")
    buf = torch.tensor([0.0 if total is None else float(total), float(count)],
                       dtype=torch.float64, device=device)
    if reduce:
        all_reduce_sum(buf)
    return float(buf[0]), int(round(float(buf[1])))


def ppl_or_bpc(mean_nll: float, kind: str) -> dict:
    """{'ppl': ...} for word/bpe vocabularies, {'bpc': ...} for char/byte (mean NLL / ln 2)."""
    if kind in ("char", "byte"):
        return {"bpc": mean_nll / math.log(2)}
    return {"ppl": math.exp(min(mean_nll, 700.0))}
