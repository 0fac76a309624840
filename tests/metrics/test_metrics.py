"""Metrics sinks (JSONL, console), the throughput meter, baselines and `dist-lm compare`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dist_lm.config import Config
from dist_lm.errors import UserError
from dist_lm.metrics.baselines import baseline_key, read_baseline, record_baseline
from dist_lm.metrics.compare import compare_command
from dist_lm.metrics.meter import ThroughputMeter, perplexity_fields
from dist_lm.metrics.writer import MetricsSink


def test_meter():
    """Tokens over the interval's seconds on the meter's clock, per device, the data-wait share
    of the interval; a snapshot starts the next interval (reset=False keeps counting)."""
    now = [100.0]
    m = ThroughputMeter(world_size=2, clock=lambda: now[0])
    m.add(1000, wait=0.5)
    m.add(3000, wait=1.5)
    now[0] = 104.0
    assert m.snapshot(reset=False) == {"tokens_per_s": 1000.0, "tokens_per_s_per_device": 500.0,
                                       "data_wait_share": 0.5, "interval_s": 4.0}
    m.add(2000, wait=0.0)
    now[0] = 106.0  # the same interval, now 6 s long with 6000 tokens
    assert m.snapshot() == {"tokens_per_s": 1000.0, "tokens_per_s_per_device": 500.0,
                            "data_wait_share": pytest.approx(2 / 6), "interval_s": 6.0}
    assert (m.tokens, m.wait, m.steps, m.t0) == (0, 0.0, 0, 106.0)
    m.add(300, wait=9.0)  # more waiting than the interval (clocks of different resolution)
    now[0] = 109.0
    s = m.snapshot()
    assert s["tokens_per_s"] == 100.0 and s["interval_s"] == 3.0 and s["data_wait_share"] == 1.0


def test_ppl_or_bpc():
    assert perplexity_fields(math.log(100), False) == {"ppl": pytest.approx(100)}
    assert perplexity_fields(math.log(2) * 1.5, True, "valid_") == {"valid_bpc": pytest.approx(1.5)}


def test_sink_and_compare(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = Config()
    cfg.log.progress = False
    for name, best in (("a", 5.0), ("b", 4.0)):
        sink = MetricsSink(tmp_path / name, cfg, enabled=True, total_steps=10)
        sink.log({"step": 1, "loss": 6.0, "tokens_per_s": 100.0, "tokens_per_s_per_device": 100.0})
        sink.log({"step": 2, "epoch": 1, "valid_loss": best, "elapsed_s": 30.0,
                  "valid_seconds": 10.0, "tokens": 4000,
                  **perplexity_fields(best, False, "valid_")})
        sink.close()
    assert "loss 6" in capsys.readouterr().out
    MetricsSink(tmp_path / "off", cfg, enabled=False).log({"step": 1})
    assert not (tmp_path / "off").exists()
    compare_command([str(tmp_path / "a"), str(tmp_path / "b")], out=str(tmp_path / "cmp"))
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table.index("/b") < table.index("/a")  # sorted by best valid ppl
    # per validation: epoch, step, valid ppl, train s = 30 - 10, valid s, 4000 tokens / 20 s
    assert f"Per validation of {tmp_path / 'b'}:" in table
    assert f"| 1 | 2 | {math.exp(4.0):.2f} | 20 | 10 | 200 |" in table
    with pytest.raises(UserError):
        compare_command([str(tmp_path / "nothing")])


def test_compare_plots_valid_ppl_against_tokens(tmp_path, monkeypatch):
    """compare --out draws valid ppl and train loss against training tokens by default (runs of
    different global batch meet at equal tokens, not equal steps), one line per run named by
    its directory; --x steps and --x seconds switch the axis; the final record (the best's
    values at the last step) is no point."""
    from matplotlib.figure import Figure

    runs = {"b20": 20, "b80": 80}  # tokens per step = batch x bptt 10: steps differ at equal tokens
    for name, batch in runs.items():
        recs = []
        for k, tok in enumerate((4000, 8000), 1):
            step = tok // (batch * 10)
            recs.append({"step": step, "loss": 6.0 - k, "tokens": tok, "elapsed_s": 7.0 * k,
                         "tokens_per_s": 1.0})
            recs.append({"step": step, "epoch": k, "valid_loss": 5.0 - k, "valid_ppl": 100.0 / k,
                         "tokens": tok, "elapsed_s": 7.0 * k + 1, "valid_seconds": 1.0})
        recs.append({"step": step, "final": True, "valid_ppl": 1.0, "tokens": tok})
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    drawn = {}
    save = Figure.savefig

    def record(fig, path, *a, **kw):
        ax = fig.axes[0]
        drawn[Path(path).name] = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata()))
                                  for ln in ax.lines}
        drawn[Path(path).name]["axes"] = (ax.get_xlabel(), ax.get_ylabel())
        return save(fig, path, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", record)
    dirs = [str(tmp_path / n) for n in runs]
    compare_command(dirs, out=str(tmp_path / "cmp"))  # the default axis: tokens
    assert sorted(drawn) == ["train_loss_vs_tokens.png", "valid_ppl_vs_tokens.png"]
    valid = drawn["valid_ppl_vs_tokens.png"]
    assert valid["axes"] == ("training tokens", "valid ppl")
    assert valid["b20"] == valid["b80"] == ([4000, 8000], [100.0, 50.0])
    assert drawn["train_loss_vs_tokens.png"]["b80"] == ([4000, 8000], [5.0, 4.0])
    assert (tmp_path / "cmp" / "valid_ppl_vs_tokens.png").stat().st_size > 0
    drawn.clear()
    compare_command(dirs, out=str(tmp_path / "cmp"), x="steps")
    assert drawn["valid_ppl_vs_steps.png"]["b20"][0] == [20, 40]
    assert drawn["valid_ppl_vs_steps.png"]["b80"][0] == [5, 10]
    assert drawn["valid_ppl_vs_steps.png"]["axes"][0] == "optimizer steps"
    from dist_lm.__main__ import main

    main(["compare", *dirs, "--out", str(tmp_path / "cmp"), "--x", "seconds"])  # the CLI flag
    assert drawn["valid_ppl_vs_seconds.png"]["b20"][0] == [8.0, 15.0]
    with pytest.raises(UserError, match="tokens, steps, seconds"):
        compare_command(dirs, out=str(tmp_path / "cmp"), x="epochs")


def test_baselines(tmp_path, monkeypatch):
    monkeypatch.setenv("DIST_LM_BASELINES", str(tmp_path / "b.json"))
    args = ({"emb_size": 16}, 10000, 4, 70, "fp32", "cpu")
    k = baseline_key(*args)
    assert read_baseline(k) == 0.0
    record_baseline(k, 1234.0, "test")
    assert read_baseline(k) == 1234.0
    for i, other in enumerate(({"emb_size": 32}, 33278, 8, 140, "bf16", "NVIDIA H100")):
        changed = list(args)
        changed[i] = other
        assert baseline_key(*changed) != k  # model, vocab, micro, bptt, dtype, device: all count
    assert json.loads((tmp_path / "b.json").read_text())[k]["source"] == "test"


def test_wandb_dir_is_each_runs_own_and_one_line(tmp_path, monkeypatch, capsys):
    """Two runs in one process each write W&B files into their own run directory (nothing
    sticks to the first), and W&B says one line per run."""
    from dist_lm.run.directory import new_run_id

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    ids = []
    for name in ("a", "b"):
        rd = tmp_path / name
        rd.mkdir()
        ids.append(new_run_id(rd))
        sink = MetricsSink(rd, Config(), enabled=True)
        sink.log({"step": 1, "loss": 1.0})
        sink.close()
        assert list((rd / "wandb").glob(f"offline-run-*-{ids[-1]}")), name
    assert ids[0] != ids[1]
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if "wandb" in ln.lower()]
    assert len(lines) == 2 and all("wandb sync" in ln for ln in lines), lines
