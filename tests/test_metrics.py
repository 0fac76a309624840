"""Metrics sinks (JSONL, console), the throughput meter, baselines and `dist-lm compare`."""

from __future__ import annotations

import json
import math

import pytest

from dist_lm.config import Config
from dist_lm.errors import UserError
from dist_lm.metrics import (MetricsSink, ThroughputMeter, baseline_key, compare_command,
                             perplexity_fields, read_baseline, record_baseline)


def test_meter():
    m = ThroughputMeter(world_size=2)
    m.add(1000, wait=0.0)
    m.add(1000, wait=0.0)
    s = m.snapshot()
    assert s["tokens_per_s"] > 0 and s["tokens_per_s_per_device"] == pytest.approx(s["tokens_per_s"] / 2)
    assert 0 <= s["data_wait_share"] <= 1 and m.tokens == 0


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
    from dist_lm.runs import new_run_id

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
