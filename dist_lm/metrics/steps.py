"""Steps and tokens to a target perplexity against the batch size, and the curve the measured
gradient noise scale predicts (issue 22; launch/steps_to_target.sh, docs/scaling.md).

McCandlish et al. 2018: the steps S and examples E a batch B needs to reach a given loss follow

    S(B) = S_min (1 + B_noise / B)        E(B) = E_min (1 + B / B_noise)

with B_noise the critical batch. Here every batch is in tokens per step (streams x bptt), so
that more streams and a longer window are on one axis. The base run fixes S_min: it reached
the target in S_base steps at batch B_base, so S_min = S_base / (1 + B_noise / B_base), and
B_noise is what the base run measured when it reached the target (its last logged
b_noise_tokens, a smoothed estimate over about its last 100 steps): McCandlish et al. compare
the critical batch of a target loss with the noise scale measured at that loss. The median of its
logged estimates over the whole run (the noise scale grows as the loss falls; the median is
not moved by the spikes of an estimate whose |G|² is near zero) gives a second, lower
prediction, reported beside it. Nothing is fitted to the other runs' steps, so their
agreement with the curve is a test of it.

    python -m dist_lm.metrics.steps RUN... --base RUN [--out DIR]
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from ..errors import UserError
from ..fileio import write_text_atomic
from .compare import read_metrics


def steps_to_target(evals: list[dict], target: float) -> tuple[float, float] | None:
    """(steps, tokens) at which the validation ppl first reached `target`, interpolated in log
    ppl between that validation and the one before it (steps and tokens both linear between the
    two); None when no validation reached it. `evals`: validation records in order, each with
    valid_ppl, step and tokens."""
    prev = {"step": 0, "tokens": 0, "valid_ppl": math.inf}
    for r in evals:
        if r["valid_ppl"] <= target:
            lo, hi = math.log(r["valid_ppl"]), math.log(prev["valid_ppl"])
            # the share of the interval after which the target was crossed (the whole interval
            # when the previous point is the untrained start, where nothing was measured)
            f = 1.0 if not math.isfinite(hi) or hi == lo else (hi - math.log(target)) / (hi - lo)
            return (prev["step"] + f * (r["step"] - prev["step"]),
                    prev["tokens"] + f * (r["tokens"] - prev["tokens"]))
        prev = r
    return None


def predicted_steps(s_min: float, b_noise: float, batch: float) -> float:
    """S(B) = S_min (1 + B_noise / B) (McCandlish et al. 2018, eq. 2.11)."""
    return s_min * (1.0 + b_noise / batch)


def summarize_run(run_dir: str | Path, target: float, rows: list[dict]) -> dict:
    """One run's row from its metrics records (read_metrics): its batch in streams and tokens,
    rule, steps and tokens to `target`, final validation ppl, and its noise scale (median and
    last logged) and adascale gain (mean)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{run_dir} has no config.json; pass run directories written by "
                        f"`dist-lm train`.")
    cfg = json.loads(cfg_path.read_text())
    evals = [r for r in rows if "valid_ppl" in r and not r.get("final")]
    final = [r for r in rows if r.get("final")]
    logged = [r for r in rows if "b_noise_tokens" in r and not r.get("final")]
    gains = [r["adascale_gain"] for r in logged if "adascale_gain" in r]
    streams, bptt = cfg["train"]["global_batch"], cfg["train"]["bptt"]
    hit = steps_to_target(evals, target)
    out = {"run": str(run_dir), "name": run_dir.name, "rule": cfg["schedule"]["scaling"] or "none",
           "streams": streams, "bptt": bptt, "batch_tokens": streams * bptt,
           "steps": max((r.get("step", 0) for r in rows), default=0),
           "tokens": max((r.get("tokens", 0) for r in rows), default=0),
           "final_valid_ppl": (final[-1] if final else evals[-1] if evals else {}).get("valid_ppl"),
           "stop": final[-1].get("stop") if final else "(no final record)",
           "steps_to_target": hit[0] if hit else None,
           "tokens_to_target": hit[1] if hit else None}
    if logged:
        out["b_noise_tokens_median"] = statistics.median(r["b_noise_tokens"] for r in logged)
        out["b_noise_tokens_last"] = logged[-1]["b_noise_tokens"]
    if gains:
        out["gain_mean"] = sum(gains) / len(gains)
    return out


def analyse(runs: list[str], base: str) -> dict:
    """The base run's target, B_noise and S_min, every run's row with its predicted steps, and
    per batch the fewest steps any rule took (the measured curve)."""
    records = {r: read_metrics(r) for r in (base, *runs)}  # each metrics.jsonl read once
    final = [r for r in records[base] if r.get("final") and "valid_ppl" in r]
    if not final:
        raise UserError(f"the base run {base} has no final validation; let it finish first.")
    target = final[-1]["valid_ppl"]
    b = summarize_run(base, target, records[base])
    if "b_noise_tokens_median" not in b:
        raise UserError(f"the base run {base} did not measure the noise scale; it needs two "
                        f"micro batches per step (train.micro_batch = half the global batch).")
    bn, bn_median = b["b_noise_tokens_last"], b["b_noise_tokens_median"]
    s_base = b["steps_to_target"] or b["steps"]
    s_min = s_base / (1.0 + bn / b["batch_tokens"])
    s_min_median = s_base / (1.0 + bn_median / b["batch_tokens"])
    rows = [summarize_run(r, target, records[r]) for r in runs]
    for r in rows:
        r["predicted_steps"] = predicted_steps(s_min, bn, r["batch_tokens"])
        r["predicted_steps_median"] = predicted_steps(s_min_median, bn_median, r["batch_tokens"])
        r["final_vs_base"] = (r["final_valid_ppl"] / target - 1.0
                              if r["final_valid_ppl"] else None)
    best: dict[int, dict] = {}
    for r in rows:
        s = r["steps_to_target"]
        if s is not None and (r["batch_tokens"] not in best
                              or s < best[r["batch_tokens"]]["steps_to_target"]):
            best[r["batch_tokens"]] = r
    curve = [{"batch_tokens": k, "run": v["name"], "steps": v["steps_to_target"],
              "predicted": v["predicted_steps"],
              "error": v["steps_to_target"] / v["predicted_steps"] - 1.0,
              "predicted_median": v["predicted_steps_median"],
              "error_median": v["steps_to_target"] / v["predicted_steps_median"] - 1.0}
             for k, v in sorted(best.items())]
    return {"target_ppl": target, "base": b["name"], "b_noise_tokens": bn,
            "b_noise_tokens_median": bn_median, "s_min": s_min, "s_min_median": s_min_median,
            "rows": rows, "curve": curve}


def markdown(res: dict) -> str:
    def f(v, spec=",.0f"):
        return "-" if v is None else format(v, spec)

    lines = [f"target: valid ppl {res['target_ppl']:.2f} (the base run {res['base']}'s final); "
             f"B_noise {res['b_noise_tokens']:,.0f} tokens (the base run's at the target), "
             f"S_min {res['s_min']:.1f} steps; with the base run's median B_noise "
             f"{res['b_noise_tokens_median']:,.0f} tokens, S_min {res['s_min_median']:.1f}", "",
             "| run | rule | streams x bptt | steps run | steps to target | predicted | tokens to "
             "target | final valid ppl | vs base | median B_noise (tokens) | mean gain | stop |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(res["rows"], key=lambda r: (r["batch_tokens"], r["rule"])):
        lines.append(
            f"| {r['name']} | {r['rule']} | {r['streams']} x {r['bptt']} | {r['steps']} | "
            f"{f(r['steps_to_target'], '.1f')} | {r['predicted_steps']:.1f} | "
            f"{f(r['tokens_to_target'])} | {f(r['final_valid_ppl'], '.2f')} | "
            f"{f(None if r['final_vs_base'] is None else 100 * r['final_vs_base'], '+.1f')} % | "
            f"{f(r.get('b_noise_tokens_median'))} | {f(r.get('gain_mean'), '.2f')} | {r['stop']} |")
    lines += ["", "| batch (tokens) | fewest steps to target (run) | predicted | error | "
              "predicted from the median B_noise | error |", "|---:|---|---:|---:|---:|---:|"]
    for c in res["curve"]:
        lines.append(f"| {c['batch_tokens']:,} | {c['steps']:.1f} ({c['run']}) | "
                     f"{c['predicted']:.1f} | {100 * c['error']:+.1f} % | "
                     f"{c['predicted_median']:.1f} | {100 * c['error_median']:+.1f} % |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Steps to target against the batch in tokens (log-log): each rule's runs, and the curve
    the base run's B_noise predicts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    rules = sorted({r["rule"] for r in res["rows"]})
    for rule, marker in zip(rules, "os^vD*"):
        pts = sorted((r["batch_tokens"], r["steps_to_target"]) for r in res["rows"]
                     if r["rule"] == rule and r["steps_to_target"] is not None)
        if pts:
            ax.plot(*zip(*pts), marker=marker, linestyle="-", label=rule)
    sizes = sorted({r["batch_tokens"] for r in res["rows"]})
    lo, hi = sizes[0] / 1.5, sizes[-1] * 1.5
    xs = [lo * (hi / lo) ** (i / 99) for i in range(100)]
    ax.plot(xs, [predicted_steps(res["s_min"], res["b_noise_tokens"], x) for x in xs], "k--",
            label=f"S_min (1 + B_noise/B), B_noise {res['b_noise_tokens']:,.0f} (at target)")
    ax.plot(xs, [predicted_steps(res["s_min_median"], res["b_noise_tokens_median"], x) for x in xs],
            "k:", label=f"the same with the run's median B_noise {res['b_noise_tokens_median']:,.0f}")
    ax.set(xscale="log", yscale="log", xlabel="global batch (tokens per step)",
           ylabel=f"steps to valid ppl {res['target_ppl']:.1f}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dist_lm.metrics.steps", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (other paths are skipped)")
    ap.add_argument("--base", required=True, help="the base run: its final ppl is the target")
    ap.add_argument("--out", help="write steps.md, steps.json and steps_vs_batch.png here")
    a = ap.parse_args(argv)
    runs = [r for r in a.runs if (Path(r) / "config.json").is_file()]
    if not runs:
        raise UserError("none of the paths is a run directory (with config.json).")
    res = analyse(runs, a.base)
    text = markdown(res)
    if a.out:
        out = Path(a.out)
        write_text_atomic(out / "steps.md", text)
        write_text_atomic(out / "steps.json", json.dumps(res, indent=1) + "\n")
        plot(res, out / "steps_vs_batch.png")
    print(text, end="")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"dist-lm: error: {e}")
