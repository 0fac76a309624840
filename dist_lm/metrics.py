"""Training metrics: a throughput meter, rank-0 sinks (console + tqdm, metrics.jsonl, W&B),
single-device baselines for scaling efficiency, and `dist-lm compare`.

    meter = ThroughputMeter(world_size)
    meter.add(tokens=seq_len * global_batch, wait=data_wait_s)   # once per optimizer step
    sink = MetricsSink(run_dir, cfg, enabled=is_main(), total_steps=n)
    sink.log({"step": 100, "loss": 4.6, ...})                    # console, JSONL and W&B
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

from .fileio import write_text_atomic
from .errors import UserError


class ThroughputMeter:
    """Tokens/s over the current log interval and the share of time spent waiting for data."""

    def __init__(self, world_size: int = 1):
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.wait = 0.0
        self.steps = 0

    def add(self, tokens: int, wait: float = 0.0) -> None:
        self.tokens += tokens
        self.wait += wait
        self.steps += 1

    def snapshot(self, reset: bool = True) -> dict:
        dt = max(1e-9, time.perf_counter() - self.t0)
        tps = self.tokens / dt
        out = {"tokens_per_s": tps, "tokens_per_s_per_device": tps / self.world_size,
               "data_wait_share": min(1.0, self.wait / dt), "interval_s": dt}
        if reset:
            self.reset()
        return out


def ppl_or_bpc(mean_nll: float, kind: str) -> dict:
    """{'ppl': ...} for word/bpe vocabularies, {'bpc': ...} for char/byte (mean NLL / ln 2)."""
    if kind in ("char", "byte"):
        return {"bpc": mean_nll / math.log(2)}
    return {"ppl": math.exp(min(mean_nll, 700.0))}


def perplexity_fields(mean_nll: float, char_level: bool, prefix: str = "") -> dict:
    """ppl_or_bpc for a word (ppl) or character/byte (bpc) corpus, keys prefixed."""
    fields = ppl_or_bpc(mean_nll, "char" if char_level else "word")
    return {prefix + k: v for k, v in fields.items()}


# ---- single-device baselines (scaling efficiency) -------------------------------------------

def baselines_path() -> Path:
    """Where single-device tokens/s are recorded ($DIST_LM_BASELINES overrides)."""
    env = os.environ.get("DIST_LM_BASELINES")
    return Path(env) if env else Path.home() / ".cache" / "dist-lm" / "baselines.json"


def device_kind(device) -> str:
    """'cpu', or the GPU's name (an H100's baseline says nothing about an A100)."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def baseline_key(model_cfg: dict, vocab_size: int, micro_batch: int, bptt: int, dtype: str,
                 device: str) -> str:
    """Same model and vocabulary, per-device batch and window, dtype and device kind -> same key
    (tokens/s depend on every one of them)."""
    blob = json.dumps({"model": model_cfg, "vocab": vocab_size, "micro": micro_batch,
                       "bptt": bptt, "dtype": dtype, "device": device}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_baseline(key: str) -> float:
    p = baselines_path()
    try:
        return float(json.loads(p.read_text()).get(key, {}).get("tokens_per_s", 0.0))
    except (OSError, ValueError, AttributeError):
        return 0.0


def record_baseline(key: str, tokens_per_s: float, source: str) -> None:
    p = baselines_path()
    try:
        table = json.loads(p.read_text()) if p.is_file() else {}
    except ValueError:
        table = {}
    table[key] = {"tokens_per_s": tokens_per_s, "source": source, "time": time.time()}
    write_text_atomic(p, json.dumps(table, indent=2) + "\n")


# ---- sinks (rank 0 only) -------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


CONSOLE_KEYS = ("epoch", "step", "loss", "ppl", "bpc", "valid_loss", "valid_ppl", "valid_bpc",
                "test_ppl", "test_bpc", "lr", "seq_len", "grad_norm", "tokens_per_s",
                "tokens_per_s_per_device", "data_wait_share", "scaling_efficiency", "b_noise",
                "b_noise_tokens", "adascale_gain", "averaging")


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records a checkpoint at `step` had seen: a resume continues the log from
    there (records a killed run wrote after its last checkpoint are dropped, as is a finished
    run's final record)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if r.get("step", 0) <= step and not r.get("final"):
            keep.append(line + "\n")
    write_text_atomic(path, "".join(keep))


class MetricsSink:
    """Console line, tqdm bar, metrics.jsonl and W&B. A no-op on ranks other than 0.

    `resume_step` None starts the log afresh (a new run wipes it, as llm.c does); a step
    continues it from the checkpoint at that step (truncate_metrics).
    """

    def __init__(self, run_dir: str | Path, cfg, enabled: bool = True, total_steps: int = 0,
                 initial_step: int = 0, resume_step: int | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.bar = None
        self.wandb = None
        self.summary: dict = {}
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            truncate_metrics(path, resume_step)
        self.jsonl = open(path, "a" if resume_step is not None else "w", buffering=1)
        if cfg.log.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps or None, initial=initial_step, unit="step",
                            dynamic_ncols=True, leave=False)
        self._init_wandb(cfg)

    def _init_wandb(self, cfg) -> None:
        mode = wandb_mode(cfg)
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            print("dist-lm: wandb is not installed; W&B logging is off", file=sys.stderr)
            return
        from .config import to_dict

        self.wandb = wandb_init(wandb, mode, cfg, self.run_dir, config=to_dict(cfg),
                                tags=list(cfg.log.tags) or None)
        local = Path(self.wandb.dir).parent  # wandb.dir is the run's files/ subdirectory
        where = local if mode == "offline" else getattr(self.wandb, "url", "") or local
        how = f"; upload with `wandb sync {local}`" if mode == "offline" else ""
        print(f"dist-lm: W&B {mode} run {self.wandb.id} in {where}{how}", flush=True)

    def progress(self, n: int = 1, **postfix) -> None:
        """Advance the bar; a postfix value may be a callable, called only when a bar is shown
        (so the trainer reads its device-side loss only then)."""
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: _fmt(v() if callable(v) else v)
                                      for k, v in postfix.items()}, refresh=False)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        self.jsonl.write(json.dumps(record) + "\n")
        line = " | ".join(f"{k} {_fmt(record[k])}" for k in CONSOLE_KEYS if k in record)
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                           step=int(record.get("step", 0)))

    def set_summary(self, **values) -> None:
        if not self.enabled:
            return
        self.summary.update(values)
        if self.wandb is not None:
            for k, v in values.items():
                self.wandb.summary[k] = v

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def wandb_mode(cfg) -> str:
    """The W&B mode of a run: $WANDB_MODE wins over the config's log.wandb_mode."""
    return os.environ.get("WANDB_MODE") or cfg.log.wandb_mode


def wandb_id(run_dir: Path) -> str:
    """The run's W&B id: the id created once in RUN_DIR/run.json (a resume and `eval` reuse it,
    a fresh run into the directory gets a new one); runs older than run.json used a hash of
    their path."""
    from .runs import run_id

    return run_id(run_dir) or hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]


def wandb_init(wandb, mode: str, cfg, run_dir: Path, **kwargs):
    """wandb.init for a run directory: its id, resumed if it exists; files under $WANDB_DIR if
    set, else the run directory (read per call: nothing sticks to the first run of a process);
    W&B's own console output off (dist-lm prints one line instead)."""
    return wandb.init(mode=mode, project=cfg.log.project, group=cfg.log.group or None,
                      name=cfg.log.name or run_dir.name, dir=os.environ.get("WANDB_DIR") or
                      str(run_dir), resume="allow", id=wandb_id(run_dir),
                      settings=wandb.Settings(silent=True, console="off"), **kwargs)


# ---- dist-lm compare -----------------------------------------------------------------------

def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
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
    if train:
        out["tokens_per_s"] = sum(r["tokens_per_s"] for r in train) / len(train)
        out["tokens_per_s_per_device"] = sum(r.get("tokens_per_s_per_device", 0) for r in train) / len(train)
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
                                           "tokens_per_s_per_device")
                               if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
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


def _plots(records: dict[str, list[dict]], out: Path, x: str = "tokens") -> list[Path]:
    """<y>_vs_<x>.png for train loss and valid ppl (bpc for character corpora) against x
    (PLOT_X), one line per run (run dir -> records); returns the files written."""
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
    for key, ylabel in (("loss", "train loss"), ("valid_ppl", "valid ppl"),
                        ("valid_bpc", "valid bpc")):
        series = {}
        for r, rows in records.items():
            pts = [(m[xkey], m[key]) for m in rows
                   if key in m and xkey in m and not m.get("final")]
            if pts:
                series[r] = pts
            elif any(key in m and not m.get("final") for m in rows):
                print(f"dist-lm: {r}: no {xkey!r} in its {key} records; left out of the plot "
                      f"against {x}", file=sys.stderr)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for r, pts in series.items():
            ax.plot(*zip(*pts), marker=None if key == "loss" else "o", label=labels[r])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if key == "valid_ppl":
            ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        path = out / f"{'train_loss' if key == 'loss' else key}_vs_{x}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
