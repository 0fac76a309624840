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


# ---- large-batch lr rules (schedule.scaling; docs/scaling.md) ------------------------------

def _ref_peak(rule, lr, batch, base):
    """The rules as the papers write them."""
    r = batch / base
    return {"none": lr, "linear": lr * r, "sqrt": lr * r ** 0.5}[rule]


@pytest.mark.parametrize("rule", ["none", "linear", "sqrt"])
@pytest.mark.parametrize("batch", [5, 20, 80, 320])
def test_scaling_rules_match_the_reference_formula(rule, batch):
    s = LRSchedule(ScheduleConfig(scaling=rule, base_batch=20, warmup_steps=0), 30.0, batch)
    want = _ref_peak(rule, 30.0, batch, 20)
    assert s.scaling.peak_lr == pytest.approx(want) and s.scaling.ratio == batch / 20
    assert seq(s, 3) == pytest.approx([want] * 3)  # no warm-up given: the peak from step 0
    # every kind starts from the scaled peak (cosine: at progress 0)
    c = LRSchedule(ScheduleConfig(kind="cosine", scaling=rule, base_batch=20, warmup_steps=0),
                   30.0, batch)
    assert c.lr(0, 0.0, 0) == pytest.approx(want) and c.lr(5, 1.0, 0) == pytest.approx(0.0)


@pytest.mark.parametrize("rule,batch,want", [
    ("sqrt", 80, 100), ("sqrt", 320, 100),       # LEGW: steps fixed, tokens grow with r
    ("linear", 80, 25), ("linear", 320, 7),      # Goyal: tokens fixed, ceil(100 / r) steps
    ("linear", 60, 34),                          # ceil(100 / 3) = 34
    ("sqrt", 20, 0), ("linear", 20, 0),          # ratio 1: the recipe, no warm-up
    ("sqrt", 10, 0), ("none", 320, 0)])          # lr not raised: no warm-up
def test_derived_warmup(rule, batch, want):
    s = LRSchedule(ScheduleConfig(scaling=rule, base_batch=20, warmup_base_steps=100), 30.0, batch)
    assert s.scaling.warmup_steps == want and s.scaling.warmup_derived
    peak = _ref_peak(rule, 30.0, batch, 20)
    lrs = seq(s, want + 2)
    assert lrs == pytest.approx([peak * min(1.0, (k + 1) / want) if want else peak
                                 for k in range(want + 2)])


def test_explicit_warmup_wins_and_the_start_line():
    s = LRSchedule(ScheduleConfig(scaling="sqrt", base_batch=20, warmup_steps=400), 30.0, 80)
    assert s.scaling.warmup_steps == 400 and not s.scaling.warmup_derived
    assert s.scaling.describe() == ("lr 30 -> 60 for global batch 80 = 4x base 20, sqrt rule, "
                                    "warm-up 400 steps")
    s = LRSchedule(ScheduleConfig(scaling="none", base_batch=20), 30.0, 320)
    assert s.scaling.describe() == ("lr 30 for global batch 320 = 16x base 20, no scaling rule "
                                    "(schedule.scaling=none), no warm-up")
    s = LRSchedule(ScheduleConfig(scaling="linear", base_batch=80), 30.0, 20)
    assert s.scaling.describe().startswith("lr 30 -> 7.5 for global batch 20 = 1/4x base 80")


def test_scaling_keys_through_load_config(tmp_path):
    from dist_lm.config import load_config

    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[train]\nglobal_batch = 20\n[optim]\nlr = 30.0\n")
    # base_batch defaults to the file's global batch, not the command line's
    cfg = load_config(recipe, {"train.global_batch": 320, "schedule.scaling": "sqrt"})
    assert cfg.schedule.base_batch == 20 and cfg.schedule.warmup_steps == -1
    assert LRSchedule(cfg.schedule, 30.0, 320).scaling.peak_lr == pytest.approx(120.0)
    # unset scaling: none, recorded explicitly
    cfg = load_config(recipe, {"train.global_batch": 80})
    assert cfg.schedule.scaling == "none" and cfg.schedule.base_batch == 20
    assert LRSchedule(cfg.schedule, 30.0, 80).peak == 30.0
    # the old meaning: base_batch alone is the linear rule, warm-up only as given
    cfg = load_config(recipe, {"train.global_batch": 80, "schedule.base_batch": 20})
    assert (cfg.schedule.scaling, cfg.schedule.warmup_steps) == ("linear", 0)
    assert LRSchedule(cfg.schedule, 30.0, 80).peak == 120.0
    # no file: the defaults are the recipe
    assert load_config(None, {"train.global_batch": 8}).schedule.base_batch == 80
    # file fixes the warm-up, the command line asks to derive it: the command line wins
    recipe.write_text("[train]\nglobal_batch = 20\n[schedule]\nwarmup_steps = 50\n"
                      "scaling = \"sqrt\"\n")
    cfg = load_config(recipe, {"schedule.warmup_base_steps": 30, "train.global_batch": 80})
    assert LRSchedule(cfg.schedule, 30.0, 80).scaling.warmup_steps == 30
    assert LRSchedule(load_config(recipe, {"train.global_batch": 80}).schedule, 30.0,
                      80).scaling.warmup_steps == 50


@pytest.mark.parametrize("over,match", [
    ({"schedule.scaling": "cubic"}, "schedule.scaling must be none, linear, sqrt or adascale"),
    ({"schedule.scaling": "sqrt", "schedule.warmup_steps": 10, "schedule.warmup_base_steps": 5},
     "drop one of them"),
    ({"schedule.scaling": "none", "schedule.warmup_base_steps": 5}, "--schedule.scaling=linear"),
    ({"schedule.warmup_base_steps": 5}, "--schedule.scaling=linear or sqrt"),
    ({"schedule.base_batch": -1}, "schedule.base_batch must be >= 0"),
    ({"schedule.warmup_steps": -2}, "schedule.warmup_steps must be >= 0"),
    ({"train.max_micro_tokens": -5}, "train.max_micro_tokens"),
])
def test_contradicting_scaling_config_is_refused(over, match):
    from dist_lm.config import load_config

    with pytest.raises(UserError, match=match):
        load_config(None, over)


def test_resume_check_refuses_another_rule():
    a = LRSchedule(ScheduleConfig(scaling="sqrt", base_batch=20), 30.0, 80)
    b = LRSchedule(ScheduleConfig(scaling="linear", base_batch=20), 30.0, 80)
    a.check_resume(a.state_dict(), "ckpt")  # the same resolution continues
    a.check_resume({"plateau_scale": 1.0, "best": 1.0, "bad": 0}, "ckpt")  # older checkpoint
    with pytest.raises(UserError, match="--schedule.scaling=sqrt --schedule.base_batch=20 "
                                        "--schedule.warmup_steps=100"):
        b.check_resume(a.state_dict(), "ckpt")
    # optim.lr may change on resume (the rule applies to the new value)
    LRSchedule(ScheduleConfig(scaling="sqrt", base_batch=20), 3.0, 80).check_resume(
        a.state_dict(), "ckpt")


@pytest.mark.parametrize("over", [
    {},
    {"train.global_batch": 80, "schedule.scaling": "sqrt"},
    {"train.global_batch": 80, "schedule.scaling": "linear", "schedule.warmup_steps": 50},
    {"schedule.base_batch": 10},                      # the old linear rule, no warm-up
    {"train.global_batch": 40, "schedule.scaling": "sqrt", "schedule.warmup_base_steps": 30},
])
def test_a_config_written_out_whole_loads_again(tmp_path, over):
    """A search's cell.toml and a sweep's best.toml write every key of a resolved config,
    the warm-up keys included at their defaults; loading such a file must give the same
    schedule, not refuse it for 'both warm-up keys set'."""
    from dist_lm.config import load_config, to_dict
    from dist_lm.sweep.space import dump_toml
    from dist_lm.train.optim import resolve_scaling

    first = load_config("configs/ptb_small_cpu.toml", over)
    flat = {f"{sec}.{k}": v for sec, vals in to_dict(first).items() for k, v in vals.items()}
    path = tmp_path / "whole.toml"
    path.write_text(dump_toml(flat))
    again = load_config(path)
    assert again.schedule == first.schedule
    args = lambda c: (c.schedule, c.optim.lr, c.train.global_batch)  # noqa: E731
    assert resolve_scaling(*args(again)).as_dict() == resolve_scaling(*args(first)).as_dict()
