"""The dropout primitives on their own: keep_mask statistics, weight drop's values and gradient,
zoneout's mask, and that each is reproducible from torch's default generator."""


import pytest
import torch
from helpers.models import within_binomial

from dist_lm.models.dropout import keep_mask, weight_drop, zoneout_mask


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.35, 0.999])
def test_keep_mask_rate_is_the_requested_probability(keep):
    torch.manual_seed(0)
    n = 2_000_000
    m = keep_mask((n,), keep)
    assert m.dtype == torch.bool and m.shape == (n,)
    assert within_binomial(int(m.sum()), n, keep)


def test_keep_mask_elements_are_independent_of_position_and_of_each_other():
    torch.manual_seed(1)
    m = keep_mask((1000, 2000), 0.5).double()
    n_rows, n_cols = m.shape
    # every row and every column keeps about half (a striped or constant mask would not)
    assert all(within_binomial(int(k), n_cols, 0.5) for k in m.sum(1))
    assert all(within_binomial(int(k), n_rows, 0.5) for k in m.sum(0))
    # neighbours are uncorrelated: P(both kept) ~ 1/4
    both = int((m[:, 1:] * m[:, :-1]).sum())
    assert within_binomial(both, n_rows * (n_cols - 1), 0.25)


def test_keep_mask_follows_the_default_generator():
    torch.manual_seed(3)
    a = keep_mask((300, 70), 0.6)
    b = keep_mask((300, 70), 0.6)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((300, 70), 0.6), a)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.65])
def test_weight_drop_zeroes_about_p_scales_survivors_and_routes_the_gradient(p):
    torch.manual_seed(0)
    w = (torch.rand(800, 600) + 0.5).requires_grad_()  # no zeros, so dropped == zero output
    out = weight_drop(w, p, training=True)
    kept = out != 0
    assert within_binomial(int(kept.sum()), w.numel(), 1 - p)
    torch.testing.assert_close(out[kept], w.detach()[kept] / (1 - p), rtol=1e-6, atol=0)
    g = torch.randn_like(w)
    out.backward(g)
    torch.testing.assert_close(w.grad, g * kept / (1 - p), rtol=1e-6, atol=0)


def test_weight_drop_is_unbiased_and_identity_in_eval():
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    assert weight_drop(w, 0.5, training=False) is w
    assert weight_drop(w, 0.0, training=True) is w
    mean = torch.stack([weight_drop(w, 0.3, True) for _ in range(3000)]).mean(0)
    # unbiased, as F.dropout: E[drop(w)] = w (standard error per element ~ |w| * 0.012)
    torch.testing.assert_close(mean, w, rtol=0.08, atol=0.02)


def test_zoneout_mask_keeps_the_forget_gate_with_probability_one_minus_p():
    torch.manual_seed(0)
    f = torch.rand(50, 20, 100) * 0.5 + 0.25
    out = zoneout_mask(f, 0.3, training=True)
    kept = out != 0
    assert within_binomial(int(kept.sum()), f.numel(), 0.7)
    torch.testing.assert_close(out[kept], f[kept], rtol=0, atol=0)  # kept gates are not scaled
    torch.testing.assert_close(zoneout_mask(f, 0.3, training=False), f * 0.7)
