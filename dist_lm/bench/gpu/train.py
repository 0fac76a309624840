"""Part `train`: a real, time-bounded `dist-lm train` (train.max_seconds) of each recipe's shape:
the WikiText-103 QRNN on a synthetic corpus made here with WT-103's vocabulary size (267,735)
and Zipf word frequencies (the real corpus cannot be downloaded on the GPU machine), and the PTB
AWD-LSTM on PTB from the device kit (launch/gpu_kit.sh; a Zipf stand-in where the kit has none,
as in the CPU rehearsal). Tokens/s (median of the logged intervals after the first, which holds
the compile warm-up), peak GPU memory, the loss going down, and the hours one WikiText-103
epoch and the 14-epoch recipe would take at that speed.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .common import (KIT, PTB_CONFIG, WT103_CONFIG, WT103_EPOCHS, WT103_TRAIN_TOKENS, Plan,
                     free, loss_down, train_records, zipf_corpus)

STARTUP_S = 40.0  # model build, corpus, final validation/test/checkpoint around the timed run


def ptb_shards(plan: Plan, tmp: Path) -> tuple[Path, str]:
    kit = KIT / "ptb"
    if (kit / "manifest.json").is_file() and not plan.dry:
        return kit, "PTB (device kit)"
    n = 50_000 if not plan.dry else plan.train_tokens
    return zipf_corpus(tmp / "data", plan.ptb_vocab, {"train": n, "valid": 2_000,
                                                      "test": 500}), "Zipf stand-in for PTB"


def timed_train(plan: Plan, label: str, config: str, shards: Path, run_dir: Path,
                seconds: float, every: int) -> list[dict]:
    """`dist-lm train CONFIG --train.max_seconds=S ...` through the CLI's entry point."""
    from ...__main__ import main

    argv = ["train", config, f"--data.shards={shards}", f"--train.run_dir={run_dir}",
            f"--train.max_seconds={seconds:.0f}", f"--train.device={plan.device}",
            "--log.wandb_mode=disabled", "--log.progress=False", f"--log.every_steps={every}",
            "--checkpoint.every_steps=0"]
    argv += [f"--{k}={v}" for k, v in plan.tiny.items()]
    cuda = plan.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    print("+ dist-lm " + " ".join(argv), flush=True)
    main(argv)
    wall = time.perf_counter() - t0
    recs = train_records(run_dir)
    tps = [r["tokens_per_s"] for r in recs]
    steady = statistics.median(tps[1:] if len(tps) > 1 else tps) if tps else None
    rows = [{"name": f"{label}: tokens/s (median logged interval after the first)",
             "value": steady, "unit": "tokens/s", "intervals": len(tps),
             "steps": recs[-1].get("step") if recs else 0},
            judged_loss(label, [r["loss"] for r in recs]),
            {"name": f"{label}: peak GPU memory",
             "value": torch.cuda.max_memory_allocated() / 2**30 if cuda else "n/a",
             "unit": "GiB"},
            {"name": f"{label}: wall time of the command (train.max_seconds={seconds:.0f})",
             "value": wall, "unit": "s"}]
    if steady and config == WT103_CONFIG:
        epoch_h = WT103_TRAIN_TOKENS / steady / 3600
        rows += [{"name": f"{label}: projected hours for one WikiText-103 epoch "
                          f"({WT103_TRAIN_TOKENS:,} tokens)", "value": epoch_h, "unit": "h"},
                 {"name": f"{label}: projected hours for the {WT103_EPOCHS}-epoch recipe",
                  "value": WT103_EPOCHS * epoch_h, "unit": "h", "target": 0.5,
                  "target_met": WT103_EPOCHS * epoch_h <= 0.5, "target_text": "<= 0.5 h"}]
    free()
    return rows


def judged_loss(label: str, losses: list[float]) -> dict:
    """loss_down as a check once 3 intervals were logged; a time-bounded run on a slow (or
    loaded) machine may log fewer, and then the row is a figure, saying so."""
    row = loss_down(label, losses)
    if len(losses) < 3:
        del row["ok"]
        row["note"] = f"{len(losses)} logged interval(s): too few to judge"
    return row


def cases(plan: Plan, ctx) -> list[tuple[str, object]]:
    tmp = Path(ctx["tmp"])
    budget = float(ctx.get("budget_s", 2 * (plan.train_seconds + STARTUP_S)))
    # the two runs share the part's time: WT-103 (the recipe that matters) gets 60 %
    over = 0 if plan.dry else STARTUP_S

    def seconds(share: float) -> float:
        return max(5.0, min(plan.train_seconds, share * budget - over))

    def wt103():
        n = plan.train_tokens
        data = zipf_corpus(tmp / "data", plan.wt103_vocab,
                           {"train": n, "valid": 10 * 561 if not plan.dry else 200,
                            "test": 300 if not plan.dry else 100})
        return timed_train(plan, f"WT-103 QRNN recipe, V={plan.wt103_vocab:,}, bf16", WT103_CONFIG,
                           data, tmp / "runs" / "train_wt103", seconds(0.6),
                           2 if plan.dry else 25)

    def ptb():
        data, what = ptb_shards(plan, tmp)
        return timed_train(plan, f"PTB AWD-LSTM recipe on {what}", PTB_CONFIG, data,
                           tmp / "runs" / "train_ptb", seconds(0.4), 2 if plan.dry else 50)

    return [("WT-103 QRNN", wt103), ("PTB AWD-LSTM", ptb)]
