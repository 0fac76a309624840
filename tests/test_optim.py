"""Optimizers, every learning-rate schedule on its sequence, NT-ASGD trigger and averaging."""

import math

import pytest
import torch

from dist_lm.config import OptimConfig, ScheduleConfig
from dist_lm.errors import UserError
from dist_lm.train.optim import NTASGD, LRSchedule, ParamAverager, build_optimizer, uses_averaging


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("asgd", torch.optim.SGD),
                                      ("momentum", torch.optim.SGD), ("adam", torch.optim.Adam),
                                      ("amsgrad", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                      ("rmsprop", torch.optim.RMSprop), ("adagrad", torch.optim.Adagrad),
                                      ("adadelta", torch.optim.Adadelta)])
def test_build_optimizer(name, cls):
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer([p], OptimConfig(name=name, lr=0.5, weight_decay=0.0))
    assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.5
    if name == "amsgrad":
        assert opt.param_groups[0]["amsgrad"]
    if name == "momentum":
        assert opt.param_groups[0]["momentum"] == 0.9
    assert uses_averaging(OptimConfig(name=name)) == (name in ("sgd", "asgd"))
    with pytest.raises(UserError):
        build_optimizer([p], OptimConfig(name="adam", betas=[0.9]))


def seq(sched, steps, spe=10, total=None):
    """lr over steps with spe steps per epoch: (step, progress = step / total, completed epochs)."""
    total = total or steps
    return [sched.lr(s, s / total, s // spe) for s in range(steps)]


def test_constant_and_linear_scaling_and_warmup():
    s = LRSchedule(ScheduleConfig(kind="constant", base_batch=20, warmup_steps=4), 1.0, 80)
    assert seq(s, 6) == pytest.approx([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])


def test_step_decay_at_epochs():
    # decays after milestone epochs are completed (reference: `if epoch in args.when: lr /= 10`)
    s = LRSchedule(ScheduleConfig(kind="step", milestones=[1, 2], gamma=0.1), 1.0, 1)
    assert seq(s, 25) == pytest.approx([1.0] * 10 + [0.1] * 10 + [0.01] * 5)
    # an epoch milestone depends on completed epochs only, not on progress
    assert s.lr(0, 0.99, 0) == 1.0 and s.lr(0, 0.0, 1) == pytest.approx(0.1)


def test_step_decay_fixed_time_fractions():
    s = LRSchedule(ScheduleConfig(kind="step", milestones=[0.5, 0.75], gamma=0.5), 2.0, 1)
    assert [s.lr(i, i / 8, 0) for i in range(8)] == pytest.approx([2, 2, 2, 2, 1, 1, 0.5, 0.5])


def test_plateau():
    s = LRSchedule(ScheduleConfig(kind="plateau", gamma=0.5, patience=1, min_lr=0.2), 1.0, 1)
    lrs = []
    for v in [5.0, 4.0, 4.5, 4.6, 4.7, 3.0, 3.5, 3.6, 3.7, 3.8]:
        s.observe(v)
        lrs.append(s.lr(0, 0.0, 0))
    assert lrs == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.2])
    t = LRSchedule(ScheduleConfig(kind="plateau", gamma=0.5, patience=1, min_lr=0.2), 1.0, 1)
    t.load_state_dict(s.state_dict())
    assert t.lr(0, 0.0, 0) == s.lr(0, 0.0, 0)


def test_cosine():
    s = LRSchedule(ScheduleConfig(kind="cosine", min_lr=0.0, warmup_steps=2), 1.0, 1)
    got = seq(s, 11, total=10)
    want = [0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(11)]
    want[0] *= 0.5  # warmup: (step + 1) / warmup_steps
    assert got == pytest.approx(want)


def test_cyclic():
    s = LRSchedule(ScheduleConfig(kind="cyclic", min_lr=0.0, cycle_steps=2), 1.0, 1)
    assert seq(s, 9) == pytest.approx([0, 0.5, 1, 0.5, 0, 0.5, 1, 0.5, 0])


def test_ntasgd_reference_trigger():
    """Scripted validation losses; the switch happens exactly where the reference switches."""
    nt = NTASGD(nonmono=5)
    vals = [10, 9, 8, 7, 6, 5, 5.5, 4.9, 5.2, 5.1, 5.05, 5.01, 5.3]
    events = [nt.observe(v) for v in vals]

    # the reference loop, verbatim in spirit
    best_val_loss, switched_at = [], None
    for i, v in enumerate(vals):
        if switched_at is None and len(best_val_loss) > 5 and v > min(best_val_loss[:-5]):
            switched_at = i
        best_val_loss.append(v)
    assert switched_at is not None
    assert events.index("switch") == switched_at
    assert events.count("switch") == 1 and nt.averaging
    # index 11: 11 values seen, min(history[:-5]) = min(vals[:6]) = 5 and 5.01 > 5 -> switch
    assert switched_at == 11


def test_ntasgd_finetune_stops():
    nt = NTASGD(nonmono=2, finetune=True)
    assert nt.averaging
    assert [nt.observe(v) for v in [3, 2, 1, 0.9, 2.5]] == [None, None, None, None, "stop"]
    nt2 = NTASGD(nonmono=2)
    nt2.load_state_dict(nt.state_dict())
    assert nt2.history == nt.history and nt2.stop


def test_param_averager_matches_torch_asgd():
    torch.manual_seed(0)
    m1 = torch.nn.Linear(4, 3)
    m2 = torch.nn.Linear(4, 3)
    m2.load_state_dict(m1.state_dict())
    sgd = torch.optim.SGD(m1.parameters(), lr=0.1, weight_decay=1e-3)
    asgd = torch.optim.ASGD(m2.parameters(), lr=0.1, t0=0, lambd=0.0, weight_decay=1e-3)
    avg = ParamAverager(m1)
    x = torch.randn(7, 4)
    for _ in range(6):
        for m, o in ((m1, sgd), (m2, asgd)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
        avg.update()
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2)
        torch.testing.assert_close(avg.avg[n], asgd.state[p2]["ax"])
    before = {n: p.detach().clone() for n, p in m1.named_parameters()}
    avg.swap()
    for n, p in m1.named_parameters():
        torch.testing.assert_close(p, asgd.state[dict(m2.named_parameters())[n]]["ax"])
    avg.swap()
    for n, p in m1.named_parameters():
        assert torch.equal(p, before[n])
    sd = avg.averaged_state()
    assert set(sd) == set(m1.state_dict())
    restored = ParamAverager(m1)
    restored.load_state_dict(avg.state_dict())
    restored.load_average(sd)
    assert restored.count == avg.count == 6
    for n in avg.avg:
        assert torch.equal(restored.avg[n], avg.avg[n])


def test_param_averager_keeps_fp32_mean_of_bf16_params():
    """In bf16, adding (p - mean) / k to a bf16 mean rounds away most of each update; the fp32
    mean stays at the exact mean of the bf16 parameters."""
    torch.manual_seed(0)
    m = torch.nn.Linear(64, 64).to(torch.bfloat16)
    avg = ParamAverager(m)
    ref = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in m.named_parameters()}
    steps = 300
    for k in range(1, steps + 1):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 1e-2)
        avg.update()
        if k >= 2:  # the mean of the parameters after steps 2..k (ASGD's one-step lag)
            for n, p in m.named_parameters():
                ref[n] += p.double()
    for n, a in avg.avg.items():
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), ref[n] / (steps - 1), rtol=0, atol=1e-5)
    # evaluating with the average (swap in, swap out) leaves the fp32 mean as it was, although
    # the bf16 parameters held it only rounded meanwhile
    kept = {n: a.clone() for n, a in avg.avg.items()}
    live = {n: p.detach().clone() for n, p in m.named_parameters()}
    avg.swap()
    for n, p in m.named_parameters():
        assert torch.equal(p, kept[n].to(torch.bfloat16))
    avg.swap()
    for n, p in m.named_parameters():
        assert torch.equal(p, live[n]) and torch.equal(avg.avg[n], kept[n])
