"""Heads: tied adaptive softmax (split cross-entropy), mixture of softmaxes, hierarchical."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_lm.config import ModelConfig
from dist_lm.models import build_model
from dist_lm.models.heads import (AdaptiveHead, HierarchicalHead, MoSHead, auto_cutoffs,
                                  default_classes, softmax_nll)

V = 40


def randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)  # zero-initialised tombstones/biases would hide mistakes


@pytest.mark.parametrize("tied", [True, False])
def test_adaptive_log_prob_is_a_distribution_and_loss_matches_it(tied):
    torch.manual_seed(0)
    head = AdaptiveHead(6, V, [10, 25], tied=tied)
    randomize(head)
    emb = torch.randn(V, 6) if tied else None
    h = torch.randn(5, 4, 6)
    targets = torch.randint(0, V, (5, 4))
    targets[0, :3] = torch.tensor([3, 15, 33])  # every cluster present
    lp = head.log_prob(h, emb)
    assert lp.shape == (5, 4, V)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(5, 4))
    nll = head.nll(h, targets, emb)
    torch.testing.assert_close(nll, -lp.gather(-1, targets[..., None]).squeeze(-1))


def test_adaptive_is_merity_split_cross_entropy():
    torch.manual_seed(1)
    head = AdaptiveHead(6, V, [10, 25], tied=True)
    randomize(head)
    emb, h = torch.randn(V, 6), torch.randn(3, 6)
    head_logits = torch.cat([h @ emb[:10].t() + head.bias[:10], h @ head.tail_vectors.t() + head.tail_bias], -1)
    head_lp = head_logits.log_softmax(-1)
    tail_lp = (h @ emb[25:].t() + head.bias[25:]).log_softmax(-1)  # second tail: embedding rows 25..39
    word = 30
    want = head_lp[:, 11] + tail_lp[:, word - 25]
    torch.testing.assert_close(head.log_prob(h, emb)[:, word], want)
    torch.testing.assert_close(head.log_prob(h, emb)[:, 4], head_lp[:, 4])


def assert_loss_grads_match_dense(head, emb_size):
    """Gradients of head.nll equal those of -log_prob at the targets (the dense path)."""
    emb = torch.randn(V, emb_size, requires_grad=True)
    h = torch.randn(4, 3, 6, requires_grad=True)
    targets = torch.randint(0, V, (4, 3))
    params = [emb, h] + list(head.parameters())
    got = torch.autograd.grad(head.nll(h, targets, emb).sum(), params)
    want = torch.autograd.grad(-head.log_prob(h, emb).gather(-1, targets[..., None]).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_adaptive_gradients_equal_those_of_the_dense_log_prob():
    torch.manual_seed(2)
    head = AdaptiveHead(6, V, [10, 25], tied=True)
    randomize(head)
    assert_loss_grads_match_dense(head, 6)


def test_adaptive_model_with_prepared_plan_equals_direct_loss():
    torch.manual_seed(0)
    cfg = ModelConfig(emb_size=6, hidden_size=8, n_layers=2, head="adaptive", cutoffs=[10, 25])
    model = build_model(cfg, V).eval()
    x = torch.randint(0, V, (5, 3))
    y = torch.randint(0, V, (5, 3))
    out = model(x, model.init_hidden(3), y)
    lp = model.log_prob(out.output)
    torch.testing.assert_close(out.nll, -lp.gather(-1, y[..., None]).squeeze(-1))


def test_auto_cutoffs_follow_the_reference():
    assert auto_cutoffs(267_735) == [2800, 20000, 76000]  # WikiText-103
    assert auto_cutoffs(793_471) == [4200, 35000, 180000]  # One Billion Word
    assert auto_cutoffs(33_278) == []
    model = build_model(ModelConfig(emb_size=4, hidden_size=4, n_layers=1, head="adaptive"), 80_000)
    assert model.head.splits == [0, 2800, 20000, 76000, 80_000]


@pytest.mark.parametrize("tied", [True, False])
def test_mos_log_prob_is_a_distribution_and_loss_matches_it(tied):
    torch.manual_seed(0)
    head = MoSHead(6, V, n_experts=3, latent=5, tied=tied).eval()
    randomize(head)
    emb = torch.randn(V, 5) if tied else None
    h = torch.randn(4, 2, 6)
    targets = torch.randint(0, V, (4, 2))
    lp = head.log_prob(h, emb)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(4, 2))
    torch.testing.assert_close(head.nll(h, targets, emb), -lp.gather(-1, targets[..., None]).squeeze(-1))


def test_mos_equals_yang_et_al_probability_space_mixture():
    torch.manual_seed(3)
    head = MoSHead(6, V, n_experts=4, latent=5, tied=True).eval()
    randomize(head)
    emb, h = torch.randn(V, 5), torch.randn(7, 6)
    latent = torch.tanh(head.latent(h)).view(7, 4, 5)
    prob = F.softmax(latent @ emb.t() + head.bias, -1)           # [N, K, V]
    prior = F.softmax(head.prior(h), -1)
    want = (prob * prior[..., None]).sum(1).log()
    torch.testing.assert_close(head.log_prob(h, emb), want, rtol=1e-5, atol=1e-5)


def test_mos_loss_gradients_equal_those_of_the_dense_log_prob():
    torch.manual_seed(4)
    head = MoSHead(6, V, n_experts=3, latent=5, tied=True).eval()
    randomize(head)
    assert_loss_grads_match_dense(head, 5)


def test_mos_latent_dropout_only_in_training():
    torch.manual_seed(0)
    head = MoSHead(6, V, n_experts=2, latent=5, tied=False, dropoutl=0.5)
    h = torch.randn(4, 2, 6)
    t = torch.randint(0, V, (4, 2))
    assert not torch.allclose(head.nll(h, t, None), head.nll(h, t, None))
    head.eval()
    torch.testing.assert_close(head.nll(h, t, None), head.nll(h, t, None))


def test_softmax_nll_equals_cross_entropy_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 50, generator=g, dtype=torch.float64) * 4).requires_grad_()
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[:5] = 7  # repeated targets
    upstream = torch.rand(37, generator=g, dtype=torch.float64)
    got = softmax_nll(logits, targets)
    want = F.cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (ga,) = torch.autograd.grad(got, logits, upstream)
    (gb,) = torch.autograd.grad(want, logits, upstream)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: softmax_nll(x, targets), (logits,))


def test_softmax_head_loss_is_the_log_prob_at_the_targets():
    torch.manual_seed(0)
    cfg = ModelConfig(emb_size=8, hidden_size=12, n_layers=2, dropout=0, dropouth=0, dropouti=0,
                      dropoute=0, wdrop=0)
    model = build_model(cfg, 30).eval()
    x = torch.randint(0, 30, (6, 3))
    out = model(x, None, x)
    lp = model.log_prob(out.output)
    torch.testing.assert_close(out.nll, -lp.gather(2, x.unsqueeze(2)).squeeze(2))


def two_level_reference(head, h, emb, targets):
    """-log p(target) for a HierarchicalHead written out plainly: per token, a softmax over the
    classes, then a softmax over the ids of the target's class (a Python loop, no padding)."""
    w = emb if head.tied else head.weight
    S = head.class_size
    out = []
    for hn, t in zip(h.reshape(-1, h.size(-1)), targets.reshape(-1).tolist()):
        c = t // S
        class_lp = torch.log_softmax(head.class_weight @ hn + head.class_bias, 0)[c]
        ids = list(range(c * S, min(c * S + S, head.vocab_size)))
        word_lp = torch.log_softmax(w[ids] @ hn + head.bias[ids], 0)[ids.index(t)]
        out.append(-(class_lp + word_lp))
    return torch.stack(out).view(targets.shape)


@pytest.mark.parametrize("tied", [True, False])
def test_hierarchical_log_prob_is_a_distribution_and_loss_matches_it(tied):
    torch.manual_seed(0)
    head = HierarchicalHead(6, V, 7, tied=tied)  # S = 6: classes of 6 ids, the last holds 4
    assert (head.n_classes, head.class_size) == (7, 6)
    randomize(head)
    emb = torch.randn(V, 6) if tied else None
    h = torch.randn(5, 4, 6)
    targets = torch.randint(0, V, (5, 4))
    targets[0, :3] = torch.tensor([0, 36, V - 1])  # first class, the short last class, last id
    lp = head.log_prob(h, emb)
    assert lp.shape == (5, 4, V) and torch.isfinite(lp).all()
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(5, 4))
    nll = head.nll(h, targets, emb)
    torch.testing.assert_close(nll, -lp.gather(-1, targets[..., None]).squeeze(-1))


@pytest.mark.parametrize("n_classes", [1, 6, 7, V])
def test_hierarchical_equals_a_plain_two_level_softmax_in_value_and_gradient(n_classes):
    torch.manual_seed(5)
    head = HierarchicalHead(6, V, n_classes, tied=True, class_grad_scale=1.0)
    randomize(head)
    emb = torch.randn(V, 6, requires_grad=True)
    h = torch.randn(4, 3, 6, requires_grad=True)
    targets = torch.randint(0, V, (4, 3))
    targets[0, 0], targets[0, 1] = V - 1, targets[1, 1]  # the last id; a repeated target
    params = [emb, h] + list(head.parameters())
    got, want = head.nll(h, targets, emb), two_level_reference(head, h, emb, targets)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    upstream = torch.rand(4, 3)
    for a, b in zip(torch.autograd.grad(got, params, upstream),
                    torch.autograd.grad(want, params, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    lp = head.log_prob(h, emb)
    torch.testing.assert_close(lp.gather(-1, targets[..., None]).squeeze(-1), -want,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens_per_chunk", [1, 2, 100])
def test_hierarchical_within_class_op_gradcheck_in_chunks(monkeypatch, tokens_per_chunk):
    """float64 gradcheck of the within-class op, with its chunk loop cut to 1, 2 or all tokens
    (5 tokens, d=3, classes of 4 ids; the last class, ids 8..9, is padded)."""
    from dist_lm.models.heads import _WithinClassNLL
    n, d, S = 5, 3, 4
    monkeypatch.setattr(_WithinClassNLL, "chunk_elements", tokens_per_chunk * S * d)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 9, 5, 9, 8])
    cls, pos = t // S, t % S
    got = _WithinClassNLL.apply(h, w, b, cls, pos, S)
    logits = F.pad(h @ w.t() + b, (0, 2), value=float("-inf")).view(n, 3, S)  # [n, class, S]
    want = -logits[torch.arange(n), cls].log_softmax(-1)[torch.arange(n), pos]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: _WithinClassNLL.apply(*a, cls, pos, S), (h, w, b))


def test_hierarchical_head_in_the_model_and_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(emb_size=6, hidden_size=8, n_layers=2, head="hierarchical")
    model = build_model(cfg, V)
    assert isinstance(model.head, HierarchicalHead)
    assert model.head.n_classes == default_classes(V) == 6  # round(sqrt(40))
    assert build_model(ModelConfig(emb_size=6, hidden_size=8, n_layers=1, head="hierarchical",
                                   hsm_classes=4), V).head.n_classes == 4
    randomize(model.head)
    x, y = torch.randint(0, V, (5, 3)), torch.randint(0, V, (5, 3))
    out = model.train()(x, None, y)  # training mode: dropout, AR/TAR, backward through the head
    (out.nll.mean() + out.ar + out.tar).backward()
    assert model.encoder.weight.grad is not None and model.head.class_weight.grad.abs().sum() > 0
    model.eval()
    out = model(x, None, y)
    lp = model.log_prob(out.output)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(5, 3))
    torch.testing.assert_close(out.nll, -lp.gather(-1, y[..., None]).squeeze(-1))
    sd = model.state_dict()
    assert {"head.class_weight", "head.class_bias", "head.bias"} <= set(sd)
    assert "head.weight" not in sd  # tied: the embedding is the only word matrix
    torch.save(sd, tmp_path / "model.pt")
    other = build_model(cfg, V).eval()
    other.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    torch.testing.assert_close(other(x, None, y).nll, out.nll)


def test_hierarchical_classes_out_of_range_is_a_user_error():
    from dist_lm.errors import UserError
    with pytest.raises(UserError, match="hsm_classes"):
        build_model(ModelConfig(emb_size=4, hidden_size=4, n_layers=1, head="hierarchical",
                                hsm_classes=V + 1), V)


def test_hierarchical_head_is_a_config_choice():
    from dist_lm.config import load_config
    cfg = load_config(None, {"model.head": "hierarchical", "model.hsm_classes": 5,
                             "model.emb_size": 4, "model.hidden_size": 4, "model.n_layers": 1})
    model = build_model(cfg.model, V)
    assert isinstance(model.head, HierarchicalHead) and model.head.n_classes == 5


def test_adaptive_plan_counts_equal_bincount_without_calling_it(monkeypatch):
    """The adaptive head's per-cluster counts (queued without a host sync: CUDA's bincount
    reads min/max back first) equal torch.bincount's on random clusters, empty ones included."""
    from dist_lm.models.heads import _Plan

    g = torch.Generator().manual_seed(0)
    cluster = torch.randint(0, 3, (500,), generator=g)  # cluster 3 of 4 stays empty
    want = torch.bincount(cluster, minlength=4).tolist()

    def refuse(*a, **k):
        raise AssertionError("bincount called")

    monkeypatch.setattr(torch, "bincount", refuse)
    plan = _Plan(cluster, 4)
    assert plan.counts() == want and want[3] == 0
    assert torch.equal(cluster[plan.order], torch.sort(cluster, stable=True).values)


def test_hierarchical_class_grad_scale_scales_only_the_class_layer_gradients():
    torch.manual_seed(6)
    plain = HierarchicalHead(6, V, 7, tied=True, class_grad_scale=1.0)
    randomize(plain)
    scaled = HierarchicalHead(6, V, 7, tied=True)  # default scale
    scaled.load_state_dict(plain.state_dict())
    assert scaled.class_grad_scale == 0.03
    emb, h = torch.randn(V, 6, requires_grad=True), torch.randn(4, 3, 6, requires_grad=True)
    targets = torch.randint(0, V, (4, 3))
    grads = {}
    for name, head in (("plain", plain), ("scaled", scaled)):
        nll = head.nll(h, targets, emb)
        grads[name] = torch.autograd.grad(nll.sum(), [emb, h, head.bias, head.class_weight,
                                                      head.class_bias])
        grads[name + " nll"] = nll
    torch.testing.assert_close(grads["scaled nll"], grads["plain nll"])  # same function
    for i, (a, b) in enumerate(zip(grads["scaled"], grads["plain"])):
        torch.testing.assert_close(a, b * 0.03 if i >= 3 else b)


@pytest.mark.parametrize("N,V", [(1, 1), (3, 17), (37, 50), (64, 10_000), (5, 33_278)])
def test_softmax_nll_cpu_kernel_matches_fp64_cross_entropy(N, V):
    """The C kernel's path (fp32 on CPU): loss and gradient against F.cross_entropy in fp64 on
    the same inputs, with logits far from 0 (the max is subtracted), V not a multiple of 16."""
    from dist_lm.kernels import softmax_nll_cpu

    if softmax_nll_cpu.library() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(N * V)
    logits = (torch.randn(N, V, generator=g) * 8 + 40).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    upstream = torch.rand(N, generator=g)
    got = softmax_nll(logits, targets)
    assert type(got.grad_fn).__name__ == "_SoftmaxNLLBackward"
    nll, lse = softmax_nll_cpu.forward(logits.detach(), targets)  # the kernel itself
    torch.testing.assert_close(got.detach(), nll, rtol=0, atol=0)
    ref_in = logits.detach().double().requires_grad_()
    want = F.cross_entropy(ref_in, targets, reduction="none")
    torch.testing.assert_close(lse.double(), torch.logsumexp(ref_in.detach(), 1), rtol=1e-6,
                               atol=0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5)
    (ga,) = torch.autograd.grad(got, logits, upstream)
    (gb,) = torch.autograd.grad(want, ref_in, upstream.double())
    torch.testing.assert_close(ga.double(), gb, rtol=1e-4, atol=1e-7)


def test_softmax_nll_cpu_kernel_refuses_targets_out_of_range():
    """The C kernel reads logits[i, target[i]]: a bad target is an IndexError, as in torch."""
    logits = torch.randn(4, 10)
    for bad in (10, -1):
        with pytest.raises(IndexError):
            softmax_nll(logits, torch.tensor([0, 1, bad, 2]))
        with pytest.raises(IndexError):
            F.cross_entropy(logits, torch.tensor([0, 1, bad, 2]))
