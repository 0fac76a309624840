"""Output heads: tied/untied softmax, tied adaptive softmax (split cross-entropy), mixture of
softmaxes, class-based hierarchical softmax.

Every head has
    nll(h [T, b, d], targets [T, b], weight) -> [T, b] float32 negative log-likelihood
    log_prob(h [..., d], weight) -> [..., V] full log-distribution
where `weight` is the tied embedding matrix [V, E] (or None for an untied head, which owns its
own `weight`). The head never registers the embedding itself, so the tied matrix is one
parameter under one state_dict key and DDP sees it once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dropout import locked_dropout

# Merity's splits (awd-lstm-lm main.py): One Billion Word, WikiText-103.
_AUTO_CUTOFFS = ((500_000, [4200, 35000, 180000]), (75_000, [2800, 20000, 76000]))


def auto_cutoffs(vocab_size: int) -> list[int]:
    """The reference's cutoffs: [4200, 35000, 180000] above 500k words, [2800, 20000, 76000]
    above 75k (WikiText-103, 267k), else none (one cluster: the adaptive head is a plain softmax;
    at <75k words the full softmax is cheap and the split only costs accuracy)."""
    for above, cuts in _AUTO_CUTOFFS:
        if vocab_size > above:
            return list(cuts)
    return []


def cutoffs_valid(cutoffs: list[int], vocab_size: int) -> bool:
    """Whether adaptive-softmax cutoffs increase strictly within (0, vocab_size)."""
    return all(a < b for a, b in zip([0] + cutoffs, cutoffs + [vocab_size]))


class _SoftmaxNLL(torch.autograd.Function):
    """-log_softmax(logits)[i, targets[i]] per row, with the gradient written in one buffer.

    F.cross_entropy's backward fills a [N, V] zero tensor for nll_loss, scatters into it, then
    runs log_softmax's backward over it; here the gradient is exp(logp) * g with -g added at
    the targets: two passes over [N, V] instead of four (~10% of the softmax's time in a PTB
    step on CPU). On CPU (fp32, with a C compiler) both directions are one C pass each
    (kernels/softmax_nll_cpu.py): the forward keeps only the row's log-sum-exp besides the
    logits, and the backward writes exp(x - lse) g with -g at the target. Values and gradients equal
    F.cross_entropy's (tested).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        if _cpu_kernel(logits):
            from ..kernels import softmax_nll_cpu

            logits, targets = logits.contiguous(), targets.contiguous().long()
            V = logits.size(1)
            lo, hi = torch.aminmax(targets) if targets.numel() else (0, 0)
            if not 0 <= int(lo) <= int(hi) < V:
                raise IndexError(f"softmax_nll: a target is outside [0, {V})")
            nll, lse = softmax_nll_cpu.forward(logits, targets)
            ctx.save_for_backward(logits, targets, lse)
            return nll
        logp = torch.log_softmax(logits, 1)
        ctx.save_for_backward(logp, targets)
        return -logp.gather(1, targets.unsqueeze(1)).squeeze(1)

    @staticmethod
    def backward(ctx, g: Tensor):
        if len(ctx.saved_tensors) == 3:
            from ..kernels import softmax_nll_cpu

            logits, targets, lse = ctx.saved_tensors
            return softmax_nll_cpu.backward(logits, targets, lse, g), None
        logp, targets = ctx.saved_tensors
        g = g.unsqueeze(1)
        grad = torch.exp(logp).mul_(g)
        grad.scatter_add_(1, targets.unsqueeze(1), -g)
        return grad, None


def _cpu_kernel(logits: Tensor) -> bool:
    """Whether the C softmax loss (kernels/softmax_nll_cpu.py) takes these logits: fp32 on CPU,
    with a compiler to build it."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2:
        return False
    from ..kernels import softmax_nll_cpu

    return softmax_nll_cpu.library() is not None


def softmax_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """F.cross_entropy(logits [N, V], targets [N], reduction="none"), with a cheaper backward."""
    return _SoftmaxNLL.apply(logits, targets)


class Head(nn.Module):
    vocab_size: int

    def _output_layer(self, vocab_size: int, size: int, tied: bool) -> None:
        """The output bias (zeros) and, untied, its own [V, size] matrix (uniform +-0.1, as the
        reference inits its decoder); tied heads get the embedding at call time instead."""
        self.vocab_size, self.tied = vocab_size, tied
        if not tied:
            self.weight = nn.Parameter(torch.empty(vocab_size, size).uniform_(-0.1, 0.1))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def _weight(self, weight: Tensor | None) -> Tensor:
        if self.tied:
            if weight is None:
                raise ValueError("a tied head needs the embedding weight")
            return weight
        return self.weight

    def prepare(self, targets: Tensor | None):
        """Work that depends only on the targets, queued before the recurrent layers."""
        return None


class SoftmaxHead(Head):
    """logits = h W^T + b; W is the embedding (tied) or its own matrix (see _output_layer)."""

    def __init__(self, in_size: int, vocab_size: int, tied: bool):
        super().__init__()
        self._output_layer(vocab_size, in_size, tied)

    def nll(self, h: Tensor, targets: Tensor, weight: Tensor | None, plan=None) -> Tensor:
        logits = F.linear(h.reshape(-1, h.size(-1)), self._weight(weight), self.bias)
        nll = softmax_nll(logits.float(), targets.reshape(-1))
        return nll.view(targets.shape)

    def log_prob(self, h: Tensor, weight: Tensor | None) -> Tensor:
        return F.linear(h, self._weight(weight), self.bias).float().log_softmax(-1)


class _Plan:
    """Tokens of a batch grouped by cluster: `order` (token indices sorted by cluster, on device)
    and the per-cluster counts, copied to the host asynchronously."""

    def __init__(self, cluster: Tensor, n_clusters: int):
        self.cluster = cluster
        self.order = torch.argsort(cluster, stable=True)
        # scatter_add_, not bincount: CUDA's bincount reads the input's min and max back to the
        # host first (two syncs per forward); this count queues without waiting
        counts = torch.zeros(n_clusters, dtype=torch.long, device=cluster.device).scatter_add_(
            0, cluster, torch.ones_like(cluster))
        if counts.is_cuda:
            self._host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            self._host.copy_(counts, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = counts, None

    def counts(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()  # waits for the bincount only, not for the network
        return self._host.tolist()


class AdaptiveHead(Head):
    """Tied adaptive softmax, Merity's SplitCrossEntropyLoss.

    Clusters [0, c0), [c0, c1), ..., [c_{n-1}, V). The head cluster scores the first c0 words
    plus one "tombstone" vector per tail cluster (`tail_vectors`, `tail_bias`, zero-initialised);
    a tail word's log-probability is log p(its tombstone) + log softmax within its cluster, whose
    logits use the (tied) embedding rows of that cluster's words.

    Host synchronisation: a tail cluster's softmax is computed only for the tokens whose target
    falls in it, so its size depends on the data. Rather than `nonzero` (which waits for the
    whole network to run), the model calls `prepare(targets)` before the recurrent layers are
    queued: it sorts token indices by cluster and copies the cluster counts to pinned host memory
    asynchronously; the loss waits on that copy only, which finished long before, so the GPU
    queue never drains. Under torch.compile this is a graph break at the loss.
    """

    def __init__(self, in_size: int, vocab_size: int, cutoffs: list[int], tied: bool):
        super().__init__()
        cutoffs = list(cutoffs)
        if not cutoffs_valid(cutoffs, vocab_size):
            raise ValueError(f"cutoffs {cutoffs} must increase strictly within (0, {vocab_size})")
        self.splits = [0] + cutoffs + [vocab_size]
        self.n_tail = len(cutoffs)
        self._output_layer(vocab_size, in_size, tied)
        self.tail_vectors = nn.Parameter(torch.zeros(self.n_tail, in_size))
        self.tail_bias = nn.Parameter(torch.zeros(self.n_tail))
        self.register_buffer("cutoffs", torch.tensor(cutoffs, dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        return f"splits={self.splits}, tied={self.tied}"

    def prepare(self, targets: Tensor | None):
        if targets is None or self.n_tail == 0:
            return None
        cluster = torch.bucketize(targets.reshape(-1), self.cutoffs, right=True)
        return _Plan(cluster, self.n_tail + 1)

    def _clusters(self, w: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The per-cluster rows of w and of the bias, by one split each: its backward writes one
        [V, d] gradient, where a slice per cluster (w[lo:hi]) writes a zero-filled [V, d] tensor
        per cluster (4 of them at 267k words: 1.7 GB of fills per step)."""
        sizes = [b - a for a, b in zip(self.splits, self.splits[1:])]
        return w.split(sizes), self.bias.split(sizes)

    def _head_log_prob(self, h: Tensor, ws, bs) -> Tensor:
        head_w = torch.cat([ws[0], self.tail_vectors.to(ws[0].dtype)]) if self.n_tail else ws[0]
        head_b = torch.cat([bs[0], self.tail_bias]) if self.n_tail else bs[0]
        return F.linear(h, head_w, head_b).float().log_softmax(-1)

    def _tail_logits(self, h: Tensor, ws, bs, i: int) -> Tensor:
        return F.linear(h, ws[i], bs[i]).float()

    def nll(self, h: Tensor, targets: Tensor, weight: Tensor | None, plan=None) -> Tensor:
        ws, bs = self._clusters(self._weight(weight))
        h2, t = h.reshape(-1, h.size(-1)), targets.reshape(-1)
        head_lp = self._head_log_prob(h2, ws, bs)
        if self.n_tail == 0:
            return -head_lp.gather(1, t[:, None]).view(targets.shape)
        if plan is None:
            plan = self.prepare(targets)
        c0 = self.splits[1]
        head_index = torch.where(plan.cluster == 0, t, c0 - 1 + plan.cluster)
        nll = -head_lp.gather(1, head_index[:, None]).squeeze(1)
        counts, start = plan.counts(), 0
        for i, n in enumerate(counts):
            if i > 0 and n > 0:
                idx = plan.order[start:start + n]
                logits = self._tail_logits(h2.index_select(0, idx), ws, bs, i)
                tgt = (t.index_select(0, idx) - self.splits[i])[:, None]
                nll = nll.index_add(0, idx, -logits.log_softmax(-1).gather(1, tgt).squeeze(1))
            start += n
        return nll.view(targets.shape)

    def log_prob(self, h: Tensor, weight: Tensor | None) -> Tensor:
        ws, bs = self._clusters(self._weight(weight))
        head_lp = self._head_log_prob(h, ws, bs)
        c0 = self.splits[1]
        parts = [head_lp[..., :c0]]
        for i in range(1, self.n_tail + 1):
            parts.append(head_lp[..., c0 + i - 1:c0 + i]
                         + self._tail_logits(h, ws, bs, i).log_softmax(-1))
        return torch.cat(parts, -1)


class _LinearLSE(torch.autograd.Function):
    """(logsumexp_v(x W^T + b), (x W^T + b)[target]) per row, in fp32, without keeping the
    [M, V] logits for backward (they are recomputed): MoS runs this once per expert."""

    @staticmethod
    def forward(ctx, x, w, b, target):
        logits = torch.addmm(b.to(x.dtype), x, w.to(x.dtype).t()).float()
        lse = torch.logsumexp(logits, -1)
        tgt = logits.gather(1, target[:, None]).squeeze(1)
        ctx.save_for_backward(x, w, b, target, lse)
        return lse, tgt

    @staticmethod
    def backward(ctx, g_lse, g_tgt):
        x, w, b, target, lse = ctx.saved_tensors
        wx = w.to(x.dtype)
        logits = torch.addmm(b.to(x.dtype), x, wx.t()).float()
        grad = torch.exp(logits - lse[:, None]).mul_(g_lse[:, None])
        grad.scatter_add_(1, target[:, None], g_tgt[:, None])
        grad_x = (grad.to(x.dtype) @ wx) if ctx.needs_input_grad[0] else None
        grad_w = (grad.t().to(x.dtype) @ x).to(w.dtype) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0).to(b.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class MoSHead(Head):
    """Mixture of softmaxes (Yang et al. 2018): prior = softmax(W_p h) over n experts,
    latent = tanh(W_l h) split into n vectors of size E (locked dropout `dropoutl`),
    log p = logsumexp_k(log prior_k + log_softmax(latent_k W^T + b)).

    In log space, expert by expert: the loss keeps one [N, V] logit block alive at a time
    (recomputed in backward), never the [N, n, V] probabilities of the reference.
    """

    def __init__(self, in_size: int, vocab_size: int, n_experts: int, latent: int, tied: bool,
                 dropoutl: float = 0.0):
        super().__init__()
        self.n_experts, self.latent_size, self.dropoutl = n_experts, latent, dropoutl
        self.prior = nn.Linear(in_size, n_experts, bias=False)
        self.latent = nn.Linear(in_size, n_experts * latent)
        self._output_layer(vocab_size, latent, tied)

    def _experts(self, h: Tensor) -> tuple[Tensor, Tensor]:
        lat = torch.tanh(self.latent(h))
        if h.dim() == 3:
            lat = locked_dropout(lat, self.dropoutl, self.training)
        prior_lp = self.prior(h).float().log_softmax(-1)
        n = h.shape[:-1].numel()
        return prior_lp.reshape(n, self.n_experts), lat.reshape(n, self.n_experts, self.latent_size)

    def nll(self, h: Tensor, targets: Tensor, weight: Tensor | None, plan=None) -> Tensor:
        w = self._weight(weight)
        prior_lp, lat = self._experts(h)
        t = targets.reshape(-1)
        terms = []
        for k in range(self.n_experts):
            lse, tgt = _LinearLSE.apply(lat[:, k], w, self.bias, t)
            terms.append(prior_lp[:, k] + tgt - lse)
        return -torch.logsumexp(torch.stack(terms, 1), 1).view(targets.shape)

    def log_prob(self, h: Tensor, weight: Tensor | None) -> Tensor:
        w = self._weight(weight)
        prior_lp, lat = self._experts(h)
        acc = None
        for k in range(self.n_experts):
            lp = prior_lp[:, k:k + 1] + F.linear(lat[:, k], w, self.bias).float().log_softmax(-1)
            acc = lp if acc is None else torch.logaddexp(acc, lp)
        return acc.view(*h.shape[:-1], self.vocab_size)


def default_classes(vocab_size: int) -> int:
    """About sqrt(V) classes: the per-token cost C + V/C of a two-level softmax is least there."""
    return max(1, round(vocab_size ** 0.5))


class _WithinClassNLL(torch.autograd.Function):
    """-log_softmax within the target's class, per token, with static shapes and bounded memory.

    Class c holds the ids [c*S, c*S + S) (the last class may be shorter; its missing slots are
    clamped to id V-1 and masked with -inf, so their probability and gradient are exactly 0).
    For each token the S rows of its class are gathered ([M, S, d], M tokens at a time, see
    chunk_elements) and multiplied with its h; the logits are recomputed in backward rather
    than kept, so memory stays at one chunk whatever N. No host synchronisation: the chunk loop
    depends only on N = h.size(0), and every index is a device tensor (index_select, gather,
    index_add_; no boolean masks, nonzero or bincount).
    """

    # Gathered [M, S, d] elements per chunk: 4 MB of fp32 on CPU, where a chunk that stays in
    # cache and in malloc's reused heap was fastest (2^18..2^20 measured best at V=10k, S=100,
    # d=400: 1.5-3x faster than 2^24); 256 MB on a GPU, where fewer, larger launches win.
    chunk_elements = 1 << 20
    device_chunk_elements = 1 << 26

    @staticmethod
    def _chunk(h, w, b, cls, size, lo, hi):
        idx = cls[lo:hi, None] * size + torch.arange(size, device=cls.device)  # [M, S]
        valid = idx < w.size(0)
        idx = idx.clamp_max(w.size(0) - 1)
        flat = idx.view(-1)
        wg = w.index_select(0, flat).view(hi - lo, size, -1).to(h.dtype)       # [M, S, d]
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 for 16-bit inputs
        # [M, 1, d] x [M, d, S]: as a row times the transposed gather, several times faster on
        # CPU than bmm(wg, h[..., None]) (a batch of matrix-vector products)
        logits = torch.bmm(h[lo:hi, None, :], wg.transpose(1, 2)).squeeze(1).to(acc)
        logits = (logits + b.index_select(0, flat).view(hi - lo, size).to(acc)).masked_fill(
            ~valid, float("-inf"))
        return flat, wg, logits

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, w, b, cls, pos, size: int):
        n, d = h.shape
        cap = (_WithinClassNLL.chunk_elements if h.device.type == "cpu"
               else _WithinClassNLL.device_chunk_elements)
        step = max(1, cap // max(1, size * d))
        ctx.size, ctx.step = size, step
        acc = torch.promote_types(h.dtype, torch.float32)
        nll, lse = h.new_empty(n, dtype=acc), h.new_empty(n, dtype=acc)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            _, _, logits = _WithinClassNLL._chunk(h, w, b, cls, size, lo, hi)
            lse[lo:hi] = torch.logsumexp(logits, 1)
            nll[lo:hi] = lse[lo:hi] - logits.gather(1, pos[lo:hi, None]).squeeze(1)
        ctx.save_for_backward(h, w, b, cls, pos, lse)
        return nll

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")  # recompute under the forward's autocast state
    def backward(ctx, g):
        h, w, b, cls, pos, lse = ctx.saved_tensors
        size, step, n = ctx.size, ctx.step, h.size(0)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        grad_b = torch.zeros_like(b) if need_b else None
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            flat, wg, logits = _WithinClassNLL._chunk(h, w, b, cls, size, lo, hi)
            gc = g[lo:hi, None].to(lse.dtype)
            grad = torch.exp(logits - lse[lo:hi, None]).mul_(gc)   # 0 at the padded slots
            grad.scatter_add_(1, pos[lo:hi, None], -gc)
            gl = grad.to(h.dtype)
            if need_h:
                grad_h[lo:hi] = torch.bmm(gl[:, None, :], wg).squeeze(1)
            if need_w:
                outer = gl[:, :, None] * h[lo:hi, None, :]           # [M, S, d]
                grad_w.index_add_(0, flat, outer.view(-1, h.size(1)).to(w.dtype))
            if need_b:
                grad_b.index_add_(0, flat, grad.view(-1).to(b.dtype))
        return grad_h, grad_w, grad_b, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g * ctx.scale, None


class HierarchicalHead(Head):
    """Class-based two-level softmax (Goodman 2001; Mikolov et al. 2011):
    p(w | h) = p(class(w) | h) * p(w | class(w), h), with
    p(c | h) = softmax_c(h U^T + a) over C classes (`class_weight` [C, d], `class_bias` [C],
    zero-initialised, so the model starts uniform) and p(w | c, h) = softmax over the words of c
    of h W^T + b, where W and b are the tied embedding rows and the word bias, as in the other
    heads (see _output_layer). Loss cost per token: C + S dot products instead of V.

    Classes are blocks of S = ceil(V / n_classes) consecutive ids (the last block may be shorter;
    the class count is ceil(V / S), at most the requested one). Why id blocks and not Mikolov's
    frequency bins: the model is built from the vocabulary size alone and dist-lm's vocabularies
    carry no counts; word ids follow the order of first appearance in the training text
    (AWD-LSTM's order, dist_lm/data/tokenizers.py), which is correlated with frequency (frequent
    words appear early), so the blocks are roughly frequency-ordered. Equal sizes also keep the
    padded within-class softmax (static shapes, see _WithinClassNLL) at its minimum cost;
    equal-mass bins would make tail classes far larger than S, and every class would be padded
    to the largest.

    `class_grad_scale` multiplies the gradients of the class layer (an SGD learning rate of
    lr * scale for it alone; Adam-type optimizers normalise it away). Measured on PTB small
    (configs/ptb_small_cpu.toml, SGD lr 30, clip 0.25): at scale 1 the loss stalls near 7.7
    (valid ppl 1150 after an epoch, against 326 for the full softmax); at 0.03 it follows the
    full softmax's loss curve (valid ppl 338 after the epoch; docs/benchmarks.md). Likely cause:
    the class softmax has few outputs that each carry much probability, so a step that suits
    the word vectors overshoots it. Only this recipe was measured.
    """

    def __init__(self, in_size: int, vocab_size: int, n_classes: int, tied: bool,
                 class_grad_scale: float = 0.03):
        super().__init__()
        if not 1 <= n_classes <= vocab_size:
            raise ValueError(f"n_classes={n_classes} must lie in [1, {vocab_size}]")
        self.class_size = -(-vocab_size // n_classes)
        self.n_classes = -(-vocab_size // self.class_size)
        self._output_layer(vocab_size, in_size, tied)
        self.class_weight = nn.Parameter(torch.zeros(self.n_classes, in_size))
        self.class_bias = nn.Parameter(torch.zeros(self.n_classes))
        self.class_grad_scale = class_grad_scale

    def extra_repr(self) -> str:
        return (f"classes={self.n_classes}, class_size={self.class_size}, tied={self.tied}, "
                f"class_grad_scale={self.class_grad_scale}")

    def _class_logits(self, h: Tensor) -> Tensor:
        u, a, k = self.class_weight, self.class_bias, self.class_grad_scale
        if k != 1.0:
            u, a = _ScaleGrad.apply(u, k), _ScaleGrad.apply(a, k)
        return F.linear(h, u.to(h.dtype), a.to(h.dtype)).float()

    def nll(self, h: Tensor, targets: Tensor, weight: Tensor | None, plan=None) -> Tensor:
        w = self._weight(weight)
        h2, t = h.reshape(-1, h.size(-1)), targets.reshape(-1)
        cls, pos = torch.div(t, self.class_size, rounding_mode="floor"), t % self.class_size
        nll = softmax_nll(self._class_logits(h2), cls)
        # Tokens sorted by class, so that consecutive chunks gather the same rows and add into
        # the same gradient rows while they are in cache (Zipf: about half the tokens fall in
        # the first class); 10-30% faster on CPU. The sort is on device, no host sync.
        order = torch.argsort(cls, stable=True)
        within = _WithinClassNLL.apply(h2.index_select(0, order), w, self.bias,
                                       cls.index_select(0, order), pos.index_select(0, order),
                                       self.class_size)
        within = within.new_empty(within.shape).index_copy(0, order, within)
        return (nll + within).view(targets.shape)

    def log_prob(self, h: Tensor, weight: Tensor | None) -> Tensor:
        logits = F.linear(h, self._weight(weight), self.bias).float()
        pad = self.n_classes * self.class_size - self.vocab_size
        logits = F.pad(logits, (0, pad), value=float("-inf"))
        within = logits.view(*h.shape[:-1], self.n_classes, self.class_size).log_softmax(-1)
        lp = self._class_logits(h).log_softmax(-1)[..., None] + within
        return lp.reshape(*h.shape[:-1], -1)[..., :self.vocab_size]
