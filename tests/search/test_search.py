"""dist-lm search: the controller, the supernet, the search loop, resume, derive and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_lm.config import load_config
from dist_lm.models import build_model
from dist_lm.models.cell import ACTIVATIONS, CellLayer, Genotype, parse_genotype, uniform_genotype
from dist_lm.search import Controller, Search, build_supernet, set_cell
from helpers.cli import run_cli
from helpers.config import tiny_config
from helpers.models import all_genotypes
from helpers.runs import metrics


# ---- the controller ------------------------------------------------------------------------

def test_controller_log_probs_and_entropy_match_a_direct_computation():
    torch.manual_seed(0)
    ctl = Controller(3, hidden=16, temperature=2.0, tanh_constant=2.5)
    for p in ctl.parameters():  # larger weights: a distribution far from uniform
        p.data.mul_(10)
    with torch.no_grad():
        scored = [(g, *ctl.score(g)) for g in all_genotypes(3)]
        logp = torch.stack([lp for _, lp, _ in scored]).double()
        ent = torch.stack([e for _, _, e in scored]).double()
    p = logp.exp()
    assert abs(float(p.sum()) - 1.0) < 1e-5            # a distribution over the whole space
    assert float(p.max()) > 3 * float(p.min())          # and not the uniform one
    # chain rule: the expected sum of per-decision entropies is the entropy of the cell
    torch.testing.assert_close((p * ent).sum(), -(p * logp).sum(), rtol=1e-5, atol=1e-6)
    # the first decision by hand: node 1's activation from the start input
    with torch.no_grad():
        h, _ = ctl.lstm(ctl.start)
        want = F.softmax(2.5 * torch.tanh(ctl.act_head(h).view(-1) / 2.0), -1)
        _, steps = ctl.decisions(genotype=scored[0][0])
        torch.testing.assert_close(steps[0][0].exp(), want)
    # sample() reports the log-probability score() gives, and draws by it
    gen = torch.Generator().manual_seed(1)
    probs = {str(g): float(lp.exp()) for g, lp, _ in scored}
    counts: dict[str, int] = {}
    n = 1500
    with torch.no_grad():
        for _ in range(n):
            g, lp, e = ctl.sample(gen)
            if len(counts) < 5:
                torch.testing.assert_close(lp, ctl.score(g)[0])
            counts[str(g)] = counts.get(str(g), 0) + 1
    top = sorted(probs, key=probs.get)[-3:]
    for k in top:
        assert abs(counts.get(k, 0) / n - probs[k]) < 4 * (probs[k] / n) ** 0.5 + 0.01


def test_every_cell_the_controller_or_the_uniform_sampler_emits_builds_and_runs():
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    cells = set()
    for n in (1, 2, 5, 12):
        ctl = Controller(n, hidden=8, temperature=1.0, tanh_constant=0.0)
        for _ in range(40):
            with torch.no_grad():
                cells.add(ctl.sample(gen)[0])
            cells.add(uniform_genotype(n, gen))
    n = 6
    cells |= {Genotype(("identity",) * n, (0, 1, 2, 3, 4, 5)),        # chain
              Genotype(("relu",) * n, (0, 1, 1, 1, 1, 1)),            # star: 5 loose ends
              Genotype(("sigmoid",) * n, (0, 1, 1, 2, 2, 3))}
    x = torch.randn(4, 2, 6)
    for g in cells:
        assert parse_genotype(str(g)) == g
        layer = CellLayer(6, 7, parse_genotype(str(g)), wdrop=0.3)
        out, (h,) = layer(x, layer.init_hidden(2))
        assert out.shape == (4, 2, 7) and torch.isfinite(out).all()
        out.sum().backward()
    # the supernet runs every one of them on the same weights
    cfg = load_config(None, {"model.emb_size": 6, "model.hidden_size": 7, "model.n_layers": 2})
    for n_nodes in (1, 2, 5, 12, 6):
        net = build_supernet(cfg.model, 20, n_nodes)
        inp = torch.randint(20, (3, 2))
        for g in [c for c in cells if c.n_nodes == n_nodes][:15]:
            set_cell(net, g)
            out = net(inp, net.init_hidden(2), inp)
            assert torch.isfinite(out.nll).all()


# ---- the search loop -----------------------------------------------------------------------

SEARCH = {"search.n_nodes": 4, "search.rounds": 2, "search.shared_steps": 3,
          "search.controller_steps": 2, "search.controller_hidden": 12,
          "search.derive_samples": 3, "search.derive_windows": 2, "model.n_layers": 1,
          "model.dropout": 0.2, "model.wdrop": 0.3, "model.dropoute": 0.1,
          "train.variable_bptt": True, "optim.lr": 5.0, "log.every_steps": 1,
          "search.controller_lr": 0.01}


def test_a_rigged_reward_moves_the_controller_towards_its_cells(tmp_path, ptb_slice):
    cfg = tiny_config(tmp_path / "s", ptb_slice, **{**SEARCH, "search.controller_lr": 0.05,
                                                               "search.baseline_decay": 0.8})
    s = Search(cfg)
    relu = ACTIVATIONS.index("relu")

    def p_relu() -> float:
        with torch.no_grad():
            _, steps = s.controller.decisions(genotype=uniform_genotype(4))
        return float(steps[0][0].exp()[relu])

    before = p_relu()
    for _ in range(40):
        s.controller_step(reward_fn=lambda g: float(g.acts[0] == "relu"))
    after = p_relu()
    assert after > before + 0.2, (before, after)


def _states(s: Search):
    return ({k: v.clone() for k, v in s.model.state_dict().items()},
            {k: v.clone() for k, v in s.controller.state_dict().items()}, s.baseline)


def _assert_same(a, b):
    for x, y in zip(a[:2], b[:2]):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k
    assert a[2] == b[2]


def test_search_resume_is_exact(tmp_path, ptb_slice):
    """Stopped in the controller phase (step 4) and in the shared phase (step 7) and resumed
    each time: the same supernet, controller, baseline and derived cell as one run."""
    a = Search(tiny_config(tmp_path / "a", ptb_slice, **SEARCH))
    ra = a.run()
    assert a.step == 10 and a.baseline is not None
    b = Search(tiny_config(tmp_path / "b", ptb_slice, **SEARCH))
    assert b.run(stop_at=4)["stopped"]
    b = Search(tiny_config(tmp_path / "b", ptb_slice, **SEARCH))
    assert b.run(resume="auto", stop_at=7)["stopped"] and b.step == 7
    c = Search(tiny_config(tmp_path / "b", ptb_slice, **SEARCH))
    rc = c.run(resume="auto")
    _assert_same(_states(a), _states(c))
    assert ra["cell"] == rc["cell"] and ra["valid_ppl"] == rc["valid_ppl"]
    da = json.loads((tmp_path / "a" / "derive.json").read_text())
    dc = json.loads((tmp_path / "b" / "derive.json").read_text())
    assert da["samples"] == dc["samples"]
    recs = metrics(tmp_path / "b")
    assert [r["step"] for r in recs if "phase" in r] == list(range(1, 11))  # no step twice
    assert {r["phase"] for r in recs if "phase" in r} == {"shared", "controller"}
    assert all("loss" in r for r in recs if r.get("phase") == "shared")


def test_derived_config_trains_and_random_search_uses_the_same_budget(tmp_path, ptb_slice):
    cfg = tiny_config(tmp_path / "r", ptb_slice, **SEARCH, **{"search.random": True})
    s = Search(cfg)
    before = {k: v.clone() for k, v in s.controller.state_dict().items()}
    res = s.run()
    assert s.step == 10  # the same steps as the controller search: nothing learned in them
    assert all(torch.equal(v, s.controller.state_dict()[k]) for k, v in before.items())
    toml = Path(res["config"])
    cell_cfg = load_config(toml, {})
    assert cell_cfg.model.arch == "cell" and parse_genotype(cell_cfg.model.cell).n_nodes == 4
    assert str(parse_genotype(cell_cfg.model.cell)) == res["cell"]
    model = build_model(cell_cfg.model, 200)
    inp = torch.randint(200, (5, 2))
    assert torch.isfinite(model(inp, model.init_hidden(2), inp).nll).all()
    # a fresh search into a directory that holds one is refused; --overwrite restarts it
    from dist_lm.errors import UserError

    with pytest.raises(UserError, match="already holds a run"):
        Search(cfg).run()
    # resuming a random search as an ENAS search (or the reverse) is refused
    enas = tiny_config(tmp_path / "r", ptb_slice, **SEARCH)
    with pytest.raises(UserError, match="written with search.random=True, this run has False"):
        Search(enas).run(resume="auto")


@pytest.mark.slow
def test_cli_search_resume_and_bad_cell(tmp_path, ptb_slice):
    conf = tmp_path / "search.toml"
    conf.write_text(f'[data]\nshards = "{ptb_slice}"\n')
    over = [f"--{k}={v}" for k, v in {**SEARCH, "model.emb_size": 16, "model.hidden_size": 24,
                                       "train.global_batch": 4, "train.bptt": 12,
                                       "train.device": "cpu", "data.eval_batch_size": 2,
                                       "log.wandb_mode": "disabled", "log.progress": False,
                                       "search.rounds": 1,
                                       "train.run_dir": str(tmp_path / "run")}.items()]
    r = run_cli("search", conf, *over, "--random", cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "random search" in (tmp_path / "run" / "cell.toml").read_text()
    assert (tmp_path / "run" / "checkpoints" / "step-00000005" / "DONE").is_file()
    r = run_cli("search", conf, *over, "--search.rounds=2", "--resume=auto", "--random",
                cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    derived = json.loads((tmp_path / "run" / "derive.json").read_text())
    assert derived["step"] == 10 and derived["random"] is True
    r = run_cli("train", conf, "--model.arch=cell", "--model.cell=tanh:0 gelu:1",
                "--train.global_batch=4", "--train.bptt=12", "--data.eval_batch_size=2",
                f"--train.run_dir={tmp_path / 'bad'}", cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "dist-lm: error: model.cell: node 2 ('gelu:1') has unknown activation 'gelu'; use one "
        "of tanh, relu, identity, sigmoid (e.g. \"tanh:0 relu:1 relu:1 identity:2\")."]
    assert not (tmp_path / "bad").exists()


def test_sigterm_checkpoints_and_the_search_resumes(tmp_path, ptb_slice):
    """SIGTERM mid-search: the step finishes, a checkpoint is written, Stopped (exit 75) is
    raised; --resume auto then finishes the search."""
    import signal

    from dist_lm.errors import Stopped

    cfg = tiny_config(tmp_path / "s", ptb_slice, **SEARCH)
    s = Search(cfg)
    step = s.one_step

    def one_step():
        rec = step()
        if s.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return rec

    s.one_step = one_step
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped, match="SIGTERM at step 2.*--resume auto"):
        s.run()
    assert signal.getsignal(signal.SIGTERM) == previous  # the handlers are restored
    assert [p.name for p in s.checkpoints()] == ["step-00000002"]
    r = Search(tiny_config(tmp_path / "s", ptb_slice, **SEARCH))
    assert r.run(resume="auto")["event"] == "derived" and r.step == 10


@pytest.mark.parametrize("key,value,match", [
    ("search.n_nodes", 0, "search.n_nodes must be >= 1"),
    ("search.derive_windows", -1, "search.derive_windows must be >= 0"),
    ("search.reward_c", 0, "search.reward_c must be > 0"),
    ("search.baseline_decay", 1.0, r"search.baseline_decay must be in \[0, 1\)"),
    ("dist.engine", "ddp", "runs on one device"),
])
def test_bad_search_settings_are_one_clear_error(tmp_path, ptb_slice, key, value, match):
    from dist_lm.errors import UserError

    with pytest.raises(UserError, match=match):
        Search(tiny_config(tmp_path / "s", ptb_slice, **{**SEARCH, key: value}))
    assert not (tmp_path / "s").exists()


def test_time_budget_stops_the_search_and_derives(tmp_path, ptb_slice):
    s = Search(tiny_config(tmp_path / "t", ptb_slice, **{**SEARCH, "search.max_seconds": 1e-9}))
    res = s.run()
    assert s.step == 1 and res["event"] == "derived"
    assert [p.name for p in s.checkpoints()] == ["step-00000001"]
    assert load_config(tmp_path / "t" / "cell.toml").model.cell == res["cell"]
