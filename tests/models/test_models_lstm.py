"""AWD-LSTM model: equality with a plain nn.LSTM LM, weight drop, regularizers, state handling."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_lm.config import ModelConfig
from dist_lm.errors import UserError
from dist_lm.models import RNNLanguageModel, build_model, detach_hidden
from dist_lm.models.dropout import embedded_dropout, locked_dropout

V = 50


def small(arch="lstm", **kw) -> ModelConfig:
    base = dict(arch=arch, emb_size=8, hidden_size=12, n_layers=3)
    base.update(kw)
    return ModelConfig(**base)


def no_dropout(arch="lstm", **kw) -> ModelConfig:
    return small(arch, dropout=0, dropouth=0, dropouti=0, dropoute=0, wdrop=0, **kw)


def batch(T=6, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (T, b), generator=g), torch.randint(0, V, (T, b), generator=g)


def loss_of(out):
    return out.nll.mean() + out.ar + out.tar


class PlainLM(nn.Module):
    """The textbook LM: nn.Embedding -> nn.LSTM per layer -> tied linear -> log_softmax."""

    def __init__(self, model: RNNLanguageModel):
        super().__init__()
        self.encoder = copy.deepcopy(model.encoder)
        self.rnns = nn.ModuleList()
        for layer in model.rnns:
            cls = nn.LSTM if layer.mode == "LSTM" else nn.GRU
            rnn = cls(layer.input_size, layer.hidden_size)
            with torch.no_grad():
                rnn.weight_ih_l0.copy_(layer.weight_ih_l0)
                rnn.weight_hh_l0.copy_(layer.weight_hh_l0_raw)
                rnn.bias_ih_l0.copy_(layer.bias_ih_l0)
                rnn.bias_hh_l0.copy_(layer.bias_hh_l0)
            self.rnns.append(rnn)
        self.bias = copy.deepcopy(model.head.bias)

    def forward(self, x, hidden):
        x = self.encoder(x)
        new = []
        for rnn, h in zip(self.rnns, hidden):
            x, hn = rnn(x, h if isinstance(rnn, nn.LSTM) else h[0])
            new.append(hn)
        return F.linear(x, self.encoder.weight, self.bias).log_softmax(-1), new


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_matches_plain_nn_lstm_without_dropout(arch):
    torch.manual_seed(0)
    model = build_model(no_dropout(arch), V)
    with torch.no_grad():
        model.head.bias.normal_()  # a non-trivial bias is compared too
    plain = PlainLM(model)
    x, y = batch()
    hidden = model.init_hidden(3)
    hidden = [tuple(torch.randn_like(t) for t in h) for h in hidden]
    model.train()  # no dropouts: training mode must be the same function
    out = model(x, hidden, y)
    ref_lp, ref_hidden = plain(x, hidden)
    torch.testing.assert_close(model.log_prob(out.output), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.nll, -ref_lp.gather(-1, y[..., None]).squeeze(-1),
                               rtol=1e-5, atol=1e-5)
    for got, ref in zip(out.hidden, ref_hidden):
        ref = ref if isinstance(ref, tuple) else (ref,)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_layer_sizes_and_tied_head():
    tied = build_model(small(), V)
    assert [r.hidden_size for r in tied.rnns] == [12, 12, 8]
    assert tied.head.bias.abs().sum() == 0  # zero decoder bias
    assert tied.encoder.weight.abs().max() <= 0.1
    assert not hasattr(tied.head, "weight")
    untied = build_model(small(tie_weights=False), V)
    assert [r.hidden_size for r in untied.rnns] == [12, 12, 12]
    assert untied.head.weight.shape == (V, 12)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_papers():
    ptb = build_model(ModelConfig(), 10_000)          # emb 400, hidden 1150, 3 layers, tied
    wt2 = build_model(ModelConfig(), 33_278)
    assert 23.5e6 < n_params(ptb) < 24.5e6            # "24M" (Merity et al. 2018, table 1)
    assert 33.0e6 < n_params(wt2) < 34.0e6            # "33M" (table 2)


def test_weight_drop_masks_vary_are_off_in_eval_and_param_registered_once():
    torch.manual_seed(0)
    layer = build_model(small(wdrop=0.5, dropout=0, dropouth=0, dropouti=0, dropoute=0), V).rnns[0]
    names = [n for n, _ in layer.named_parameters()]
    assert names == ["weight_ih_l0", "weight_hh_l0_raw", "bias_ih_l0", "bias_hh_l0"]
    x = torch.randn(5, 2, 8)
    h = layer.init_hidden(2)
    a, _ = layer(x, h)
    b, _ = layer(x, h)
    assert not torch.allclose(a, b)  # a new DropConnect mask each forward
    layer.eval()
    c, _ = layer(x, h)
    d, _ = layer(x, h)
    torch.testing.assert_close(c, d)
    ref, _, _ = torch._VF.lstm(x, h, [layer.weight_ih_l0, layer.weight_hh_l0_raw, layer.bias_ih_l0,
                                   layer.bias_hh_l0], True, 1, 0.0, False, False, False)
    torch.testing.assert_close(c, ref)  # eval uses the raw weight, unscaled


def test_weight_drop_gradient_flows_through_the_mask_to_the_raw_weight():
    torch.manual_seed(1)
    layer = build_model(small(wdrop=0.5), V).rnns[1]
    x = torch.randn(4, 2, 12)
    out, _ = layer(x, layer.init_hidden(2))
    out.sum().backward()
    g = layer.weight_hh_l0_raw.grad
    assert g is not None and g.abs().sum() > 0
    assert (g == 0).float().mean() > 0.3  # dropped connections get no gradient


@pytest.mark.parametrize("arch", ["lstm", "qrnn", "gru"])
def test_train_eval_train_state_dict_reload_train(arch):
    torch.manual_seed(0)
    cfg = small(arch, wdrop=0.5)
    model = build_model(cfg, V)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    keys = list(model.state_dict())
    hidden = model.init_hidden(3)
    for mode in ("train", "eval", "train", "eval", "train"):
        getattr(model, mode)()
        with torch.set_grad_enabled(mode == "train"):
            out = model(x, hidden, y)
        if mode == "train":
            opt.zero_grad()
            loss_of(out).backward()
            opt.step()
        hidden = detach_hidden(out.hidden)
    assert list(model.state_dict()) == keys  # stable keys, nothing re-registered
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = build_model(cfg, V)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    twin = copy.deepcopy(model)
    model.eval(), fresh.eval(), twin.eval()
    with torch.no_grad():
        ref = model(x, hidden, y).nll
        torch.testing.assert_close(fresh(x, hidden, y).nll, ref)
        torch.testing.assert_close(twin(x, hidden, y).nll, ref)
    fresh.train()
    out = fresh(x, hidden, y)
    loss_of(out).backward()
    assert all(p.grad is not None for p in fresh.parameters())  # every parameter used once


def test_no_warnings_from_forward_and_backward():
    model = build_model(small(), V)
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(x, model.init_hidden(3), y)
        loss_of(out).backward()
        model.eval()
        model(x, model.init_hidden(3), y)


def test_embedding_dropout_drops_word_types_like_the_reference():
    torch.manual_seed(0)
    weight = torch.randn(V, 4)
    words = torch.randint(0, V, (20, 5))
    state = torch.get_rng_state()
    got = embedded_dropout(weight, words, 0.3, True)
    torch.set_rng_state(state)  # the reference's recipe with the same generator draws
    mask = weight.new_empty((V, 1)).bernoulli_(1 - 0.3).expand_as(weight) / (1 - 0.3)
    torch.testing.assert_close(got, F.embedding(words, mask * weight))
    zero_rows = (got == 0).all(-1)
    assert zero_rows.any() and (~zero_rows).any()
    assert torch.equal(embedded_dropout(weight, words, 0.3, False), F.embedding(words, weight))


def test_locked_dropout_shares_the_mask_over_time():
    torch.manual_seed(0)
    x = torch.ones(7, 3, 5)
    y = locked_dropout(x, 0.5, True)
    assert torch.equal(y, y[:1].expand_as(y))
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(locked_dropout(x, 0.5, False), x)


def test_ar_tar_match_the_reference_formulas_and_vanish_in_eval():
    torch.manual_seed(0)
    model = build_model(small(ar=2.0, tar=1.0), V)
    x, y = batch()
    out = model(x, model.init_hidden(3), y)
    torch.testing.assert_close(out.ar, 2.0 * out.output.pow(2).mean())
    torch.testing.assert_close(out.tar, (out.raw_output[1:] - out.raw_output[:-1]).pow(2).mean())
    assert not torch.equal(out.output, out.raw_output)  # output dropout applied in training
    model.eval()
    out = model(x, model.init_hidden(3), y)
    assert out.ar.item() == 0 and out.tar.item() == 0
    assert torch.equal(out.output, out.raw_output)


def test_hidden_state_carries_between_windows():
    torch.manual_seed(0)
    model = build_model(no_dropout(), V).eval()
    x, y = batch(T=8)
    whole = model(x, model.init_hidden(3), y).nll
    first = model(x[:5], model.init_hidden(3), y[:5])
    second = model(x[5:], detach_hidden(first.hidden), y[5:])
    torch.testing.assert_close(torch.cat([first.nll, second.nll]), whole)
    assert all(t.shape[1] == 3 for h in first.hidden for t in h)
    assert model(x[:, :2], first.hidden, y[:, :2]).nll.shape == (8, 2)  # new b: fresh hidden


def test_build_model_rejects_bad_config():
    with pytest.raises(UserError, match="model.cutoffs"):
        build_model(small(head="adaptive", cutoffs=[30, 20]), V)
    with pytest.raises(UserError, match="model.mos_latent"):
        build_model(small(head="mos", mos_latent=5), V)


def test_cudnn_layout_probe_leaves_the_default_generator_alone():
    # the probe runs at the first forward on CUDA; drawing from the default generator there would
    # shift every later dropout mask of a resumed run against the uninterrupted one
    from dist_lm.models.lstm import _LAYOUTS, _cudnn_layout

    _LAYOUTS.clear()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    _cudnn_layout("LSTM", 6, 9, torch.device("cpu"), torch.float32)
    assert ("LSTM", 6, 9, "cpu", torch.float32) in _LAYOUTS  # the probe did run
    assert torch.equal(torch.get_rng_state(), before)
