"""QRNN layer against a naive per-timestep implementation; weight drop, zoneout, window-2 state."""

from __future__ import annotations

import pytest
import torch

from dist_lm.config import ModelConfig
from dist_lm.models import build_model, detach_hidden
from dist_lm.models.qrnn import QRNNLayer


def naive_qrnn(layer: QRNNLayer, x, c0, prev=None, f_scale=1.0):
    """Gate by gate, timestep by timestep, straight from the QRNN paper (fo-pooling)."""
    W, bias = layer.weight_raw, layer.bias
    H = layer.hidden_size
    c, outs = c0, []
    for t in range(x.size(0)):
        if layer.window == 2:
            before = prev if t == 0 else x[t - 1]
            inp = torch.cat([x[t], before], -1)
        else:
            inp = x[t]
        y = inp @ W.t() + bias
        z, f, o = torch.tanh(y[:, :H]), torch.sigmoid(y[:, H:2 * H]) * f_scale, torch.sigmoid(y[:, 2 * H:])
        c = f * z + (1 - f) * c
        outs.append(o * c)
    return torch.stack(outs), c


@pytest.mark.parametrize("window", [1, 2])
def test_layer_matches_naive_implementation_across_windows(window):
    torch.manual_seed(0)
    layer = QRNNLayer(5, 7, window=window)
    x = torch.randn(9, 3, 5)
    hidden = layer.init_hidden(3)
    c0 = torch.randn(1, 3, 7)
    hidden = (c0,) + hidden[1:]
    # two windows in a row: the second must see the first's last input and state
    y1, h1 = layer(x[:4], hidden)
    y2, h2 = layer(x[4:], detach_hidden(h1))
    ref, c_ref = naive_qrnn(layer, x, c0[0], prev=torch.zeros(3, 5))
    torch.testing.assert_close(torch.cat([y1, y2]), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2[0][0], c_ref, rtol=1e-5, atol=1e-6)
    if window == 2:
        assert torch.equal(h2[1], x[-1:])
        assert len(h2) == 2
    else:
        assert len(h2) == 1


def test_gradients_match_naive_implementation():
    torch.manual_seed(1)
    layer = QRNNLayer(4, 6, window=2)
    x = torch.randn(6, 2, 4, requires_grad=True)
    c0 = torch.randn(1, 2, 6, requires_grad=True)
    prev = torch.randn(1, 2, 4)
    y, hidden = layer(x, (c0, prev))
    g, gc = torch.randn_like(y), torch.randn(2, 6)  # a loss on h and on the carried state
    leaves = [x, c0, layer.weight_raw, layer.bias]
    grads = torch.autograd.grad((y * g).sum() + (hidden[0][0] * gc).sum(), leaves)
    ref, c_ref = naive_qrnn(layer, x, c0[0], prev=prev[0])
    ref_grads = torch.autograd.grad((ref * g).sum() + (c_ref * gc).sum(), leaves)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_zoneout_masks_forget_gate_in_training_and_scales_in_eval():
    torch.manual_seed(0)
    layer = QRNNLayer(3, 4, window=1, zoneout=0.5)
    x = torch.randn(5, 2, 3)
    c0 = torch.randn(1, 2, 4)
    layer.eval()
    y, _ = layer(x, (c0,))
    ref, _ = naive_qrnn(layer, x, c0[0], f_scale=0.5)
    torch.testing.assert_close(y, ref)
    layer.train()
    a, _ = layer(x, (c0,))
    b, _ = layer(x, (c0,))
    assert not torch.allclose(a, b)


def test_weight_drop_on_gate_matrix():
    torch.manual_seed(0)
    layer = QRNNLayer(3, 4, window=2, wdrop=0.5)
    assert [n for n, _ in layer.named_parameters()] == ["weight_raw", "bias"]
    x = torch.randn(5, 2, 3)
    h = layer.init_hidden(2)
    a, _ = layer(x, h)
    b, _ = layer(x, h)
    assert not torch.allclose(a, b)
    layer.eval()
    torch.testing.assert_close(layer(x, h)[0], naive_qrnn(layer, x, h[0][0], prev=h[1][0])[0])


def test_model_window2_handles_a_change_of_batch_size():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="qrnn", emb_size=6, hidden_size=10, n_layers=2, qrnn_window=2,
                      dropout=0, dropouth=0, dropouti=0, dropoute=0, wdrop=0)
    model = build_model(cfg, 20).eval()
    x = torch.randint(0, 20, (5, 4))
    out = model(x, model.init_hidden(4), x)
    assert [len(h) for h in out.hidden] == [2, 1]  # window 2 first layer carries its last input
    small = x[:, :2]
    got = model(small, out.hidden, small).nll  # b 4 -> 2: fresh state for the new b
    torch.testing.assert_close(got, model(small, model.init_hidden(2), small).nll)


def test_training_zoneout_draws_the_masks_the_unfused_layer_drew():
    """Same seed, same generator order: the fused layer's output and gradients equal the unfused
    sequence (chunk, sigmoid, dropout.zoneout_mask, forget_mult, output gate) it replaced."""
    import torch.nn.functional as F

    from dist_lm.kernels import forget_mult
    from dist_lm.models.dropout import weight_drop, zoneout_mask

    torch.manual_seed(0)
    layer = QRNNLayer(6, 35, window=2, zoneout=0.3, wdrop=0.4).train()
    x = torch.randn(8, 3, 6)
    hidden = (torch.randn(1, 3, 35), torch.randn(1, 3, 6))

    def unfused():
        source = torch.cat([x, torch.cat([hidden[1], x[:-1]], 0)], 2)
        z, f, o = F.linear(source, weight_drop(layer.weight_raw, 0.4, True), layer.bias).chunk(3, 2)
        c = forget_mult(zoneout_mask(torch.sigmoid(f), 0.3, True), torch.tanh(z), hidden[0][0])
        return torch.sigmoid(o) * c, (c[-1:],)

    results = []
    for fn in (lambda: layer(x, hidden), unfused):
        torch.manual_seed(7)
        layer.zero_grad()
        h, new = fn()
        (h * torch.linspace(-1, 1, h.numel()).view_as(h)).sum().backward()
        results.append((h.detach(), new[0].detach(), layer.weight_raw.grad.clone()))
    assert type(layer(x, hidden)[0].grad_fn).__name__ == "_FusedCPUBackward"
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.manual_seed(8)
    assert not torch.allclose(layer(x, hidden)[0], results[0][0])  # a new draw, new masks


@pytest.mark.parametrize("window", [1, 2])
def test_carry_between_windows_stays_fp32_under_bf16_autocast(window):
    """docs/training.md: the QRNN carry is fp32 between windows. Under bf16 autocast the gates
    are bf16, but the carried c must be the fp32 recurrence on them, not its bf16 rounding."""
    torch.manual_seed(3)
    layer = QRNNLayer(16, 64, window=window)
    x = torch.randn(40, 4, 16)
    hidden = layer.init_hidden(4)
    with torch.autocast("cpu", torch.bfloat16):
        _, h1 = layer(x[:20], hidden)
        _, h2 = layer(x[20:], h1)  # the fp32 carry goes back in
        y = torch.nn.functional.linear(  # the gates the layer saw, bf16 as autocast made them
            torch.cat([x[20:], x[19:-1]], 2) if window == 2 else x[20:], layer.weight_raw,
            layer.bias)
    assert h1[0].dtype == h2[0].dtype == torch.float32
    # the fp32 reference on the second window's bf16 gates, from the same fp32 carry
    _, c_ref = naive_qrnn_gates(y.float(), h1[0][0])
    carried = (h2[0][0] - c_ref).abs().max()
    rounded = (h2[0][0].bfloat16().float() - c_ref).abs().max()
    assert rounded > 0 and carried < rounded / 50, (carried, rounded)


def naive_qrnn_gates(y, c0):
    z, f, o = y.chunk(3, dim=2)
    c, outs = c0, []
    for t in range(y.size(0)):
        c = torch.sigmoid(f[t]) * torch.tanh(z[t]) + (1 - torch.sigmoid(f[t])) * c
        outs.append(torch.sigmoid(o[t]) * c)
    return torch.stack(outs), c
