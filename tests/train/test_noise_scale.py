"""The gradient noise scale (dist_lm/train/noise_scale.py) against brute force: per-stream
gradients of a tiny real model computed one stream at a time, their covariance trace and their
mean's squared norm; unbiasedness over many draws on a linear model whose G and Σ are known; the
trainer's log fields, their resume, and the refusals. (DDP against its accumulation twin:
tests/train/test_train_dist.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from helpers.runs import one_thread  # noqa: F401  (autouse: tiny models, one thread)
from helpers.config import tiny_config
from helpers.runs import make_trainer, metrics

from dist_lm.config import Config, ModelConfig, load_config
from dist_lm.errors import UserError
from dist_lm.models import build_model
from dist_lm.train.engines import LocalEngine
from dist_lm.train.noise_scale import NoiseScale

CPU = torch.device("cpu")


def _tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(emb_size=8, hidden_size=12, n_layers=2, dropout=0, dropouth=0, dropouti=0,
                      dropoute=0, wdrop=0)  # tied weights (the default): one parameter, two uses
    return build_model(cfg, 30).train()


def _loss(model, x, y):
    out = model(x, model.init_hidden(x.shape[1]), y)
    return out.nll.mean() + out.ar + out.tar  # the trainer's loss, a mean over the streams


def _per_stream_grads(model, x, y) -> torch.Tensor:
    """[B, P]: the loss gradient of each stream alone, flattened over every parameter."""
    rows = []
    for s in range(x.shape[1]):
        model.zero_grad(set_to_none=True)
        _loss(model, x[:, s:s + 1], y[:, s:s + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def _engine_step(model, noise, x, y, micro: int) -> None:
    """One trainer step on the local engine: micro batches in turn (loss / accum), clip (its
    unclipped norm is g_big's), the noise update."""
    accum = x.shape[1] // micro
    engine = LocalEngine(model, Config(), accum)  # its step is skipped: weights stay
    noise.begin(0)
    for j in range(accum):
        cols = slice(j * micro, (j + 1) * micro)
        engine.backward(_loss(model, x[:, cols], y[:, cols]), last=j == accum - 1)
    noise.update(engine.clip(0.25))  # clipped, but the norm returned is the unclipped one
    engine.skip()


@pytest.mark.parametrize("micro", [1, 2])
def test_one_step_matches_brute_force_per_stream_gradients(micro):
    B, T = 8, 6
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 30, (T + 1, B), generator=g)
    x, y = data[:-1], data[1:]
    per = _per_stream_grads(model, x, y)
    noise = NoiseScale(model, micro=micro, accum=B // micro, world=1, global_batch=B,
                       base_batch=2, bptt=T, every=1, device=CPU, decay=0.0)
    _engine_step(model, noise, x, y, micro)
    g2, tr = noise.estimates()
    mean = per.mean(0)
    if micro == 1:  # b = 1: tr(Σ) is the streams' unbiased sample covariance trace, and |G|²
        cov_trace = ((per - mean) ** 2).sum() / (B - 1)  # the mean's squared norm less its noise
        want_tr, want_g2 = cov_trace, mean.square().sum() - cov_trace / B
    else:  # McCandlish et al. A.1 on the micro batches' means of the per-stream gradients
        small = per.view(B // micro, micro, -1).mean(1).square().sum(1).mean()
        big = mean.square().sum()
        want_g2 = (B * big - micro * small) / (B - micro)
        want_tr = (small - big) / (1 / micro - 1 / B)
    assert tr == pytest.approx(float(want_tr), rel=1e-4)
    assert g2 == pytest.approx(float(want_g2), rel=1e-4, abs=1e-4 * float(want_tr) / B)
    if noise.b_noise() is not None:
        bn = tr / g2
        assert noise.record() == pytest.approx(
            {"b_noise": bn, "b_noise_tokens": bn * T,
             "adascale_gain": (1 + bn / 2) / (1 + bn / B)})


class _Linear(torch.nn.Module):
    """loss(z) = w . z: every example's gradient is its z ~ N(mu, diag(sigma^2)), so G = mu and
    tr(Σ) = sum(sigma^2), whatever w is."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim))


def test_estimates_are_unbiased_on_a_linear_model():
    dim, B, micro, draws = 5, 12, 3, 3000
    mu = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.25])
    sigma = torch.tensor([1.0, 0.5, 2.0, 0.7, 1.5])
    model = _Linear(dim)
    noise = NoiseScale(model, micro=micro, accum=B // micro, world=1, global_batch=B,
                       base_batch=B, bptt=1, every=1, device=CPU, decay=0.0)
    g = torch.Generator().manual_seed(0)
    est = []
    for _ in range(draws):
        z = mu + sigma * torch.randn(B, dim, generator=g)
        noise.begin(0)
        for j in range(B // micro):  # the engine's backward: the micro mean over accum
            ((z[j * micro:(j + 1) * micro] @ model.w).mean() / (B // micro)).backward()
        noise.update(torch.linalg.vector_norm(model.w.grad))
        model.w.grad = None
        est.append(noise.estimates())
    est = torch.tensor(est, dtype=torch.float64)
    mean, se = est.mean(0), est.std(0) / math.sqrt(draws)
    truth = torch.tensor([mu.square().sum(), sigma.square().sum()], dtype=torch.float64)
    assert ((mean - truth).abs() <= 4 * se).all(), (mean, truth, se)
    # and not by luck: the plain |g_big|^2 is biased by tr(Σ)/B, far outside those bounds
    assert truth[1] / B > 10 * se[0]


def test_ema_bias_correction_sampling_and_left_out_steps():
    """b = 1, B = 2, the second example's gradient 0: tr(Σ) = |g1|^2 / 2, |G|^2 = 0."""
    model = _Linear(2)
    noise = NoiseScale(model, micro=1, accum=2, world=1, global_batch=2, base_batch=2, bptt=1,
                       every=2, device=CPU, decay=0.5)

    def step(i: int, z, norm=None):
        noise.begin(i)
        for zi in (torch.tensor(z), torch.zeros(2)):
            (zi @ model.w / 2).backward()  # the engine's loss / accum
        noise.update(model.w.grad.norm() if norm is None else norm)
        model.w.grad = None

    step(0, [5.0, 5.0])  # not measured: every 2 measures 0-based steps 1, 3, 5, ...
    assert noise.estimates() is None and noise.record() == {}
    step(1, [3.0, 0.0])  # tr 4.5
    noise.begin(3)  # a measured step left out (non-finite) after its backward: the next
    (torch.tensor([7.0, 7.0]) @ model.w).backward()
    model.w.grad = None
    step(3, [0.0, 1.0])  # begin() drops what it collected; tr 0.5
    g2, tr = noise.estimates()
    assert tr == pytest.approx((0.25 * 4.5 + 0.5 * 0.5) / 0.75)  # bias-corrected: 1 - 0.5^2
    assert g2 == pytest.approx(0.0, abs=1e-12) and noise.b_noise() is None
    step(5, [1.0, 1.0], norm=torch.tensor(float("nan")))  # kept non-finite: the EMAs stay
    assert noise.estimates() == (g2, tr)


def test_trainer_logs_b_noise_and_resumes_it_exactly(tmp_path, ptb_slice):
    over = {"train.micro_batch": 1, "train.max_steps": 6, "checkpoint.every_steps": 3,
            "schedule.base_batch": 2}
    full = tmp_path / "full"
    make_trainer(tiny_config(full, ptb_slice, **over)).fit()
    rows = [r for r in metrics(full) if "loss" in r and "valid_loss" not in r]
    assert len(rows) == 6 and sum("b_noise" in r for r in rows) >= 3, rows
    for r in rows:
        if "b_noise" in r:
            bn = r["b_noise"]
            assert bn > 0 and r["b_noise_tokens"] == pytest.approx(bn * 12)
            assert r["adascale_gain"] == pytest.approx((1 + bn / 2) / (1 + bn / 4))
    part = tmp_path / "part"
    make_trainer(tiny_config(part, ptb_slice, **{**over, "train.max_steps": 3})).fit()
    make_trainer(tiny_config(part, ptb_slice, **over)).fit(resume="auto")
    again = [r for r in metrics(part) if "loss" in r and "valid_loss" not in r]
    keys = ("step", "b_noise", "b_noise_tokens", "adascale_gain")
    assert [[r.get(k) for k in keys] for r in again] == [[r.get(k) for k in keys] for r in rows]


def test_auto_is_off_for_one_pass_and_refusals(tmp_path, ptb_slice):
    make_trainer(tiny_config(tmp_path / "one", ptb_slice, **{"train.max_steps": 2})).fit()
    assert not any("b_noise" in r for r in metrics(tmp_path / "one"))
    with pytest.raises(UserError, match="needs two micro batches.*--train.micro_batch"):
        make_trainer(tiny_config(tmp_path / "x", ptb_slice, **{"train.noise_scale_every": 1}))
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="noise_scale_every needs dist.engine=local or ddp"):
        load_config(None, {"dist.engine": "deepspeed", "train.noise_scale_every": 5})
    with pytest.raises(UserError, match="noise_scale_every must be"):
        load_config(None, {"train.noise_scale_every": -2})
    off = tiny_config(tmp_path / "off", ptb_slice, **{"train.micro_batch": 1,
                                                       "train.noise_scale_every": 0})
    assert make_trainer(off).noise is None


def test_bench_rows_time_the_noise_scale_against_its_absence():
    from dist_lm.bench.train import noise_scale_cost

    rows = noise_scale_cost(True, reps=1)  # the tiny --quick model; the figures are not checked
    assert [r["name"].split(": ")[1] for r in rows] == [
        "noise scale every step vs off", "noise scale's added work alone vs a step"]
    for r in rows:
        assert r["value"] > 0 and r["ratio"] == pytest.approx(r["baseline"] / r["value"])
