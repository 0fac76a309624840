"""Neural cache pointer (Grave et al. 2017, "Improving Neural Language Models with a
Continuous Cache"), as salesforce/awd-lstm-lm's pointer.py applies it to AWD-LSTM.

For the position predicting token w_t with last-layer output h_t, the keys are the outputs
h_i of the previous `window` positions and the values the tokens that followed them
(their targets). Then

    p_cache(w) = sum_{i in window, w_i = w} softmax_i(theta * h_t . h_i)
    p(w)       = (1 - lambdah) * p_vocab(w) + lambdah * p_cache(w)

Evaluation needs only p(target), and p_cache(target) only needs the window entries whose
value equals the target: one matmul per block of positions, a mask, a softmax and a masked
sum -- no vocabulary-sized work and no per-token Python loop (`NeuralCache`). When the full
distribution is wanted (any head's `log_prob`), `full_cache_distribution` scatter-adds the
attention into the vocabulary. `pointer_reference` is the literal per-token loop of the
reference implementation, kept for tests and for the benchmark baseline.

Differences from pointer.py, on purpose: the cache is used as soon as one previous position
exists (pointer.py waits until `window` positions are stored), and every stream column of a
batch keeps its own history, so validation with 10 streams and distributed evaluation work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class NeuralCache:
    """Streaming cache over [T, b] blocks of a stream; each column keeps its own history.

        cache = NeuralCache(window=500, theta=0.662)
        for block ...:
            p_cache, seen = cache.step(keys [T, b, d], targets [T, b])   # [T, b] each
            logp = mix_log_prob(-out.nll, p_cache, lambdah, seen)
    """

    def __init__(self, window: int, theta: float, normalize: bool = False):
        if window < 1:
            raise ValueError("cache window must be >= 1")
        self.window = window
        self.theta = theta
        self.normalize = normalize  # cosine instead of dot-product similarity
        self.keys: torch.Tensor | None = None    # [W', b, d] the last W' <= window keys
        self.values: torch.Tensor | None = None  # [W', b]

    @torch.no_grad()
    def step(self, keys: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p_cache(target) [T, b] for each position of the block, and whether the position
        had any history [T, b] (only the first position of a stream has none; it gets 0 and
        is scored by the vocabulary distribution alone). Then the block joins the history.
        """
        keys = keys.float()
        if self.normalize:
            keys = F.normalize(keys, dim=-1)
        T = keys.shape[0]
        hist_k = keys[:0] if self.keys is None else self.keys
        hist_v = targets[:0] if self.values is None else self.values
        W = hist_k.shape[0]
        all_k = torch.cat([hist_k, keys], 0)          # [W+T, b, d]
        all_v = torch.cat([hist_v, targets], 0)       # [W+T, b]
        scores = torch.einsum("tbd,sbd->bts", keys, all_k) * self.theta  # [b, T, W+T]
        # position t sits at W+t; it sees keys j with W+t-window <= j < W+t
        pos = torch.arange(T, device=keys.device).unsqueeze(1) + W
        j = torch.arange(W + T, device=keys.device).unsqueeze(0)
        visible = (j < pos) & (j >= pos - self.window)                  # [T, W+T]
        scores = scores.masked_fill(~visible, float("-inf"))
        has_hist = visible.any(1)                                         # [T]
        attn = torch.softmax(scores[:, has_hist], dim=-1)                 # rows with history only
        match = (all_v.t().unsqueeze(1) == targets.t().unsqueeze(2))     # [b, T, W+T]
        p = torch.zeros(targets.shape[1], T, device=keys.device)
        p[:, has_hist] = (attn * match[:, has_hist]).sum(-1)
        keep = min(self.window, W + T)
        self.keys, self.values = all_k[-keep:], all_v[-keep:]
        return p.t(), has_hist.unsqueeze(1).expand(T, targets.shape[1])


def mix_log_prob(logp_vocab: torch.Tensor, p_cache: torch.Tensor, lambdah: float,
                 seen: torch.Tensor | None = None) -> torch.Tensor:
    """log((1 - lambdah) * p_vocab + lambdah * p_cache), elementwise, in float64; positions
    where `seen` is False (no history) keep log p_vocab.

    lambdah = 0 returns logp_vocab exactly (log(1) = 0, log(0) = -inf drops the cache term).
    """
    lv = logp_vocab.detach().double()
    a = math.log1p(-lambdah) if lambdah < 1 else float("-inf")
    b = math.log(lambdah) if lambdah > 0 else float("-inf")
    mixed = torch.logaddexp(lv + a, torch.log(p_cache.double()) + b)
    return mixed if seen is None else torch.where(seen, mixed, lv)


@torch.no_grad()
def full_cache_distribution(keys: torch.Tensor, hist_keys: torch.Tensor, hist_values: torch.Tensor,
                            vocab_size: int, theta: float) -> torch.Tensor:
    """p_cache over the whole vocabulary for positions with keys [N, d] against one
    shared history (hist_keys [W, d], hist_values [W]): attention scatter-added into [N, V]."""
    attn = torch.softmax(theta * keys.float() @ hist_keys.float().t(), dim=-1)  # [N, W]
    out = torch.zeros(keys.shape[0], vocab_size, device=keys.device)
    return out.scatter_add_(1, hist_values.unsqueeze(0).expand_as(attn), attn)


@torch.no_grad()
def pointer_reference(logp_vocab: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor,
                      window: int, theta: float, lambdah: float,
                      normalize: bool = False) -> torch.Tensor:
    """The literal per-token loop (pointer.py's algorithm) for one stream.

    logp_vocab [N, V] full next-token log-distributions, keys [N, d], targets [N].
    Returns log p(target) [N]. One-hot history over the vocabulary, as the original.
    """
    N, V = logp_vocab.shape
    keys = keys.float()
    if normalize:
        keys = F.normalize(keys, dim=-1)
    onehot = torch.zeros(N, V)
    onehot[torch.arange(N), targets] = 1.0
    out = torch.empty(N, dtype=torch.float64)
    for t in range(N):
        p = logp_vocab[t].double().exp()
        lo = max(0, t - window)
        if t > 0:
            logits = torch.mv(keys[lo:t], keys[t]) * theta
            attn = torch.softmax(logits, 0).unsqueeze(1)
            ptr = (attn * onehot[lo:t]).sum(0).double()
            p = lambdah * ptr + (1 - lambdah) * p
        out[t] = torch.log(p[targets[t]])
    return out
