"""dist_lm.metrics.steps: steps to a target against the batch, and the noise scale's prediction."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from dist_lm.errors import UserError
from dist_lm.metrics import steps as S


def _run(path, streams, bptt, rule, evals, b_noise_tokens, final_ppl=None, gain=None):
    """A run directory as `dist-lm train` writes it: config.json and metrics.jsonl with train
    records (the noise scale's fields), validation records and the final record."""
    path.mkdir(parents=True)
    cfg = {"train": {"global_batch": streams, "bptt": bptt}, "schedule": {"scaling": rule}}
    (path / "config.json").write_text(json.dumps(cfg))
    recs = []
    for i, (step, ppl) in enumerate(evals):
        rec = {"step": step, "loss": math.log(ppl), "tokens_per_s": 1.0,
               "b_noise_tokens": b_noise_tokens[i], "b_noise": b_noise_tokens[i] / bptt}
        if gain is not None:
            rec["adascale_gain"] = gain
        recs += [rec, {"step": step, "tokens": step * streams * bptt, "valid_ppl": ppl,
                       "valid_loss": math.log(ppl)}]
    last = evals[-1]
    recs.append({"step": last[0], "final": True, "stop": "max_steps",
                 "valid_ppl": final_ppl or last[1], "tokens": last[0] * streams * bptt})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_steps_to_target_interpolates_in_log_ppl_between_validations():
    evals = [{"step": 10, "tokens": 100, "valid_ppl": 400.0},
             {"step": 20, "tokens": 200, "valid_ppl": 100.0}]
    # 200 is halfway between 400 and 100 in log ppl
    assert S.steps_to_target(evals, 200.0) == pytest.approx((15.0, 150.0))
    assert S.steps_to_target(evals, 400.0) == pytest.approx((10.0, 100.0))
    assert S.steps_to_target(evals, 99.0) is None
    # reached at the first validation: the whole interval from the untrained start
    assert S.steps_to_target(evals, 500.0) == pytest.approx((10.0, 100.0))


def test_runs_on_the_noise_scale_law_are_predicted_exactly(tmp_path):
    """Runs whose steps to the target follow S_min (1 + B_noise/B) at the B_noise the base run
    logged last (at the target) are predicted with zero error, on either axis (more streams or a longer
    window: the batch is in tokens); a run that never reached the target has no point."""
    rng = random.Random(0)
    bn = [rng.uniform(500, 1500) for _ in range(8)]
    at_target, median_bn, s_min, target = bn[-1], statistics.median(bn), 120.0, 150.0

    def law(batch_tokens):
        return s_min * (1 + at_target / batch_tokens)

    def evals_reaching(steps):  # validations every `steps` / 8, the last exactly at the target
        return [(round(steps * k / 8), target * (1.5 - k / 16)) for k in range(1, 9)]

    base_steps = law(32 * 35)
    base = _run(tmp_path / "base", 32, 35, "none",
                [(round(base_steps * k / 8), target * (1.5 - k / 16)) for k in range(1, 9)], bn)
    runs = [base]
    for streams, bptt in ((128, 35), (512, 35), (32, 140)):
        runs.append(_run(tmp_path / f"b{streams}t{bptt}", streams, bptt, "adascale",
                         evals_reaching(law(streams * bptt)), bn, gain=2.0))
    runs.append(_run(tmp_path / "never", 256, 35, "sqrt", [(10, 900.0), (20, 800.0)], bn))
    res = S.analyse([str(r) for r in runs], str(base))
    assert res["target_ppl"] == pytest.approx(target)
    assert res["b_noise_tokens"] == pytest.approx(at_target)
    assert res["b_noise_tokens_median"] == pytest.approx(median_bn)
    # the base run's own steps are whole numbers: S_min carries its rounding
    assert res["s_min"] == pytest.approx(round(base_steps) / (1 + at_target / 1120))
    assert res["s_min_median"] == pytest.approx(round(base_steps) / (1 + median_bn / 1120))
    by_name = {r["name"]: r for r in res["rows"]}
    assert by_name["never"]["steps_to_target"] is None
    assert by_name["b32t140"]["batch_tokens"] == 32 * 140
    assert by_name["b128t35"]["gain_mean"] == 2.0
    # 128 x 35 and 32 x 140 are one batch in tokens: one point, the fewer steps of the two
    assert [c["batch_tokens"] for c in res["curve"]] == [1120, 4480, 17920]
    for c in res["curve"]:
        assert abs(c["error"]) < 0.01, c  # whole-step rounding of the synthetic runs only
        # the second prediction is the same law at the median B_noise
        assert c["predicted_median"] == pytest.approx(res["s_min_median"] * (1 + median_bn / c[
            "batch_tokens"]))


def test_the_curve_keeps_the_fewest_steps_of_each_batch_and_the_files_are_written(tmp_path):
    bn = [800.0] * 4
    base = _run(tmp_path / "base", 32, 35, "none", [(100, 300.0), (200, 200.0)], bn)
    slow = _run(tmp_path / "b128-none", 128, 35, "none", [(60, 300.0), (120, 190.0)], bn)
    fast = _run(tmp_path / "b128-sqrt", 128, 35, "sqrt", [(40, 300.0), (80, 190.0)], bn,
                final_ppl=185.0)
    out = tmp_path / "out"
    S.main([str(base), str(slow), str(fast), str(tmp_path / "not-a-run"), "--base", str(base),
            "--out", str(out)])
    doc = json.loads((out / "steps.json").read_text())
    c128 = [c for c in doc["curve"] if c["batch_tokens"] == 128 * 35]
    assert len(c128) == 1 and c128[0]["run"] == "b128-sqrt"
    row = [r for r in doc["rows"] if r["name"] == "b128-sqrt"][0]
    assert row["final_vs_base"] == pytest.approx(185.0 / 200.0 - 1)
    assert "| b128-sqrt | sqrt | 128 x 35 |" in (out / "steps.md").read_text()
    assert (out / "steps_vs_batch.png").read_bytes()[:4] == b"\x89PNG"


def test_a_base_run_without_the_noise_scale_is_refused(tmp_path):
    base = _run(tmp_path / "base", 32, 35, "none", [(100, 300.0)], [800.0])
    lines = [json.loads(x) for x in (base / "metrics.jsonl").read_text().splitlines()]
    (base / "metrics.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if not k.startswith("b_noise")}) + "\n"
        for r in lines))
    with pytest.raises(UserError, match="micro batches"):
        S.analyse([str(base)], str(base))
