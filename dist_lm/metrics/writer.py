"""Where training metrics go, on rank 0 only: a console line and a tqdm bar, RUN_DIR/metrics.jsonl
and W&B (MetricsSink); the run's W&B identity, shared with `dist-lm eval` (wandb_init).

    sink = MetricsSink(run_dir, cfg, enabled=is_main(), total_steps=n)
    sink.log({"step": 100, "loss": 4.6, ...})                    # console, JSONL and W&B
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from ..fileio import write_text_atomic
from ..run.layout import METRICS


def fmt(v) -> str:
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
        path = self.run_dir / METRICS
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
        from ..config import to_dict

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
                self.bar.set_postfix({k: fmt(v() if callable(v) else v)
                                      for k, v in postfix.items()}, refresh=False)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        self.jsonl.write(json.dumps(record) + "\n")
        line = " | ".join(f"{k} {fmt(record[k])}" for k in CONSOLE_KEYS if k in record)
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
    from ..run.directory import run_id

    return run_id(run_dir) or hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]


def wandb_init(wandb, mode: str, cfg, run_dir: Path, **kwargs):
    """wandb.init for a run directory: its id, resumed if it exists; files under $WANDB_DIR if
    set, else the run directory (read per call: nothing sticks to the first run of a process);
    W&B's own console output off (dist-lm prints one line instead)."""
    return wandb.init(mode=mode, project=cfg.log.project, group=cfg.log.group or None,
                      name=cfg.log.name or run_dir.name, dir=os.environ.get("WANDB_DIR") or
                      str(run_dir), resume="allow", id=wandb_id(run_dir),
                      settings=wandb.Settings(silent=True, console="off"), **kwargs)
