"""`dist-lm compare`: one markdown table of several runs (best and final validation, test,
time and tokens to a target, throughput, the last measured critical batch b_noise), a
per-validation table of each, and with --out the table and PNG plots of train loss, valid
ppl/bpc and the critical batch b_noise (when the runs measured it) against tokens, steps or
seconds.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..errors import UserError
from ..fileio import write_text_atomic
from ..run.layout import METRICS
from .writer import fmt


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / METRICS
    if not p.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; pass run directories written by "
                        f"`dist-lm train`.")
    rows = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill
    return rows


def summarize(run_dir: str | Path, rows: list[dict]) -> dict:
    """One run's row of the compare table from its metrics records (read_metrics)."""
    evals = [r for r in rows if "valid_loss" in r]
    train = [r for r in rows if "tokens_per_s" in r]
    out: dict = {"run": str(run_dir), "steps": max((r.get("step", 0) for r in rows), default=0)}
    for key in ("valid_ppl", "valid_bpc", "valid_loss"):
        vals = [r[key] for r in evals if key in r]
        if vals:
            out[key] = min(vals)
            out[f"final_{key}"] = vals[-1]
    for key in ("test_ppl", "test_bpc"):
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[key] = vals[-1]
    hit = [r for r in evals if r.get("event") == "target"]
    if hit:  # train.target_ppl / target_bpc: the first validation that reached it
        out["time_to_target_s"], out["tokens_to_target"] = hit[0]["elapsed_s"], hit[0]["tokens"]
    noise = [r["b_noise"] for r in rows if "b_noise" in r]
    if noise:  # the gradient noise scale's last estimate (streams)
        out["b_noise"] = noise[-1]
    if train:
        out["tokens_per_s"] = sum(r["tokens_per_s"] for r in train) / len(train)
        out["tokens_per_s_per_device"] = (sum(r.get("tokens_per_s_per_device", 0) for r in train)
                                          / len(train))
    return out


def compare_command(runs: list[str], out: str | None = None, metric: str = "valid_ppl",
                    x: str = "tokens") -> None:
    """Print one markdown table of several runs; with `out`, first write it and PNG plots
    against `x` (tokens, steps or seconds: PLOT_X)."""
    if not runs:
        raise UserError("compare needs at least one run directory.")
    if x not in PLOT_X:
        raise UserError(f"compare --x {x!r}: choose one of {', '.join(PLOT_X)}.")
    records = {r: read_metrics(r) for r in runs}  # each metrics.jsonl read once
    rows = [summarize(r, records[r]) for r in runs]
    rows.sort(key=lambda r: r.get(metric, math.inf))
    cols = ["run", "steps"] + [c for c in ("valid_ppl", "final_valid_ppl", "test_ppl", "valid_bpc",
                                           "final_valid_bpc", "test_bpc", "time_to_target_s",
                                           "tokens_to_target", "tokens_per_s",
                                           "tokens_per_s_per_device", "b_noise")
                               if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    table = "\n".join(lines)
    for r in runs:
        epochs = epoch_table(records[r])
        if epochs:
            table += f"\n\nPer validation of {r}:\n" + epochs
    if out:  # the files first: a reader that closes stdout early (`| head`) still gets them
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        write_text_atomic(d / "compare.md", table + "\n")
        _plots(records, d, x)
    print(table)


def epoch_table(records: list[dict]) -> str:
    """Markdown: per validation, the valid metric, training and validation seconds, train tokens/s
    (from one run's metrics records, read_metrics)."""
    rows = [r for r in records
            if "valid_loss" in r and not r.get("final") and "elapsed_s" in r]
    if not rows:
        return ""
    unit = "bpc" if "valid_bpc" in rows[0] else "ppl"
    out = [f"| epoch | step | valid {unit} | train s | valid s | train tokens/s |",
           "|---|---|---|---|---|---|"]
    prev_t, prev_tok = 0.0, 0
    for r in rows:
        train_s = max(1e-9, r["elapsed_s"] - prev_t - r["valid_seconds"])
        out.append(f"| {r['epoch']} | {r['step']} | {r['valid_' + unit]:.2f} | {train_s:.0f} | "
                   f"{r['valid_seconds']:.0f} | {(r['tokens'] - prev_tok) / train_s:.0f} |")
        prev_t, prev_tok = r["elapsed_s"], r["tokens"]
    return "\n".join(out)


# compare --x: the metrics field on the x-axis and its label. Every training and validation
# record carries all three (the final record is left out: its valid values are the best's).
PLOT_X = {"tokens": ("tokens", "training tokens"),
          "steps": ("step", "optimizer steps"),
          "seconds": ("elapsed_s", "wall-clock seconds (validation included)")}


def _run_labels(runs) -> dict[str, str]:
    """Legend names: each run directory's name, its path as given where names repeat."""
    names = [Path(r).name or str(r) for r in runs]
    return {r: n if names.count(n) == 1 else str(r) for r, n in zip(runs, names)}


# the plotted fields and their axis labels (b_noise: runs that measured the noise scale)
PLOT_Y = (("loss", "train loss"), ("valid_ppl", "valid ppl"), ("valid_bpc", "valid bpc"),
          ("b_noise", "critical batch B_noise (streams)"))


def plot_series(records: dict[str, list[dict]], key: str, x: str = "tokens") -> dict:
    """{run: [(x, key) ...]} over the records that carry both (the final record left out), for
    the runs that have any; says which runs lack the x field."""
    xkey = PLOT_X[x][0]
    series = {}
    for r, rows in records.items():
        pts = [(m[xkey], m[key]) for m in rows
               if key in m and xkey in m and not m.get("final")]
        if pts:
            series[r] = pts
        elif any(key in m and not m.get("final") for m in rows):
            print(f"dist-lm: {r}: no {xkey!r} in its {key} records; left out of the plot "
                  f"against {x}", file=sys.stderr)
    return series


def _plots(records: dict[str, list[dict]], out: Path, x: str = "tokens") -> list[Path]:
    """<y>_vs_<x>.png for train loss, valid ppl (bpc for character corpora) and b_noise against
    x (PLOT_X), one line per run (run dir -> records); returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("dist-lm: matplotlib is not installed; wrote the table only", file=sys.stderr)
        return []
    xkey, xlabel = PLOT_X[x]
    labels = _run_labels(records)
    written = []
    for key, ylabel in PLOT_Y:
        series = plot_series(records, key, x)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for r, pts in series.items():
            ax.plot(*zip(*pts), marker=None if key == "loss" else "o", label=labels[r])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if key in ("valid_ppl", "b_noise"):
            ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        path = out / f"{'train_loss' if key == 'loss' else key}_vs_{x}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
