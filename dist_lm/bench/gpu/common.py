"""What every part of the GPU check shares: the sizes (Plan), tolerances, the synthetic corpus,
a real Trainer run, timing and memory helpers."""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...errors import UserError
from ...fileio import write_text_atomic

TOL_ENV = "DIST_LM_BENCH_GPU_TOL_SCALE"
REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "configs"
WT103_CONFIG = str(CONFIGS / "wt103_qrnn_12h.toml")
PTB_CONFIG = str(CONFIGS / "ptb_awd_lstm.toml")
KIT = Path(os.environ.get("DIST_LM_GPU_KIT", REPO / ".gpu_kit"))  # launch/gpu_kit.sh fills it
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DT_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# max |kernel - fp64 reference| / max |reference| per output tensor. The references start from
# the same (rounded) inputs, so what is left is the kernel's fp32 arithmetic and the rounding of
# its outputs and of the state it saves for the backward (c, h in 16 bits): ~4x the unit
# roundoff of the output dtype for 16-bit (bf16 2^-8, fp16 2^-11), fp32 gate math for fp32.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
LOSS_RTOL = 1e-4  # loss curves that must be equal (fp32, TF32 off): max relative difference
LOSS_RTOL_BF16 = 5e-2  # DeepSpeed bf16 against the fp32 curve
FUSED_TARGET = 0.6  # fused op at the WT-103 shape: bandwidth as a fraction of a device copy
WT103_VOCAB = 267_735
WT103_TRAIN_TOKENS = 103_227_021  # WikiText-103 train split, words + one <eos> per line
WT103_EPOCHS = 14  # configs/wt103_qrnn_12h.toml


@dataclass
class Plan:
    """Every size the check uses; `Plan(dry)` picks the GPU set or the tiny CPU set."""

    dry: bool
    device: str = "cuda"
    kernel_shapes: list = field(default_factory=list)  # (T, b, H)
    zoneout_shape: tuple = ()
    big_forget: tuple = ()  # T*b*H > 2^31 on the GPU
    big_fused: tuple = ()   # T*b*3H > 2^31 on the GPU
    big_lanes: int = 128    # lanes compared at each end of a big tensor
    time_shapes: list = field(default_factory=list)
    time_dtype: torch.dtype = torch.bfloat16
    time_reps: int = 15
    time_calls: int = 10    # calls per timed repetition (keeps the GPU queue fed)
    wt103_vocab: int = WT103_VOCAB
    ptb_vocab: int = 10_000
    step_reps: int = 5      # timed model steps per batch size (after 2 warm-ups)
    step_mults: tuple = (1, 4, 16)
    max_batch_mult: int = 256  # the largest-batch search stops here
    train_seconds: float = 100.0  # each recipe's time-bounded `dist-lm train` (at most)
    train_tokens: int = 20_000_000  # synthetic WT-103-like train split (the run cycles it)
    sync_steps: tuple = (12, 5)  # count host syncs over steps 13..17 (no log step among them)
    dist_steps: int = 6
    tiny: dict = field(default_factory=dict)  # model/batch overrides for --dry

    def __post_init__(self):
        if not self.dry:
            # the recipes' shapes; T = 1 and T = 1000; b*H not a multiple of 16 (1550 * 7)
            self.kernel_shapes = [(140, 60, 2500), (70, 20, 1550), (1000, 7, 1550),
                                  (1, 7, 1550), (1, 60, 2500), (140, 1, 2500)]
            self.zoneout_shape = (70, 20, 1550)
            self.big_forget = (140, 60, 256_000)  # 2,150,400,000 elements per tensor
            self.big_fused = (140, 20, 256_000)   # y: 2,150,400,000 elements
            self.time_shapes = [(140, 60, 2500), (70, 20, 1550)]
            return
        self.device = "cpu"
        # the same pattern at tiny sizes: long/short T, b*H not a multiple of 16, b = 1, T = 1
        # (the interpreter's cost grows with T x b: one Python-level program per row and block)
        self.kernel_shapes = [(3, 3, 20), (2, 2, 14), (40, 3, 7), (1, 3, 7), (1, 3, 20),
                              (3, 1, 20)]
        self.zoneout_shape = (2, 2, 14)
        self.big_forget = (3, 2, 600)  # several program blocks, the last one ragged
        self.big_fused = (2, 1, 600)
        self.big_lanes = 16
        self.time_shapes = [(20, 4, 64)]
        self.time_dtype = torch.float32  # the CPU kernels are fp32
        self.time_reps, self.time_calls = 3, 1
        self.wt103_vocab, self.ptb_vocab = 300, 200
        self.step_reps, self.max_batch_mult = 1, 32
        self.train_seconds, self.train_tokens = 3.0, 4000
        self.sync_steps = (2, 1)
        self.dist_steps = 4
        # dropouts off: a 24-unit model under the recipes' 0.1-0.5 dropouts learns too noisily
        # for a few-second run to show its loss going down (the GPU run keeps the recipes' own)
        self.tiny = {"model.emb_size": 16, "model.hidden_size": 24, "model.n_layers": 2,
                     "train.global_batch": 4, "train.bptt": 12, "data.eval_batch_size": 2,
                     **{f"model.{k}": 0.0 for k in ("dropout", "dropouth", "dropouti",
                                                    "dropoute", "wdrop")}}


def tol_scale() -> float:
    raw = os.environ.get(TOL_ENV, "1")
    try:
        return float(raw)
    except ValueError:
        raise UserError(f"{TOL_ENV}={raw!r} is not a number; unset it or give a factor such as "
                        f"0.5.") from None


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def median_timer(device: torch.device):
    """median(fn, reps, calls): median seconds per call of fn, CUDA events around `calls`
    back-to-back calls on the GPU, perf_counter on the CPU; one warm-up call first."""
    cuda = device.type == "cuda"

    def median(fn, reps: int, calls: int) -> float:
        fn()  # warm (compiles on first launch)
        if cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(calls):
                    fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3 / calls)
            else:
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times.append((time.perf_counter() - t0) / calls)
        times.sort()
        return times[len(times) // 2]

    return median


def zipf_corpus(root: Path, vocab: int, tokens: dict[str, int], seed: int = 0,
                chunk_len: int = 65536) -> Path:
    """A prepared corpus of i.i.d. Zipf tokens (p(id) ~ 1/(id+1): low ids frequent, as the
    adaptive softmax's cutoffs assume, and as word frequencies in WikiText-103 fall), written
    with the real shard writer."""
    from ...data.shards import FORMAT, MANIFEST, SplitWriter, dtype_for
    from ...data.tokenizers import WordTokenizer

    out = Path(root) / f"zipf-{vocab}-{tokens['train']}"
    if (out / MANIFEST).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1))
    cdf /= cdf[-1]
    dtype = dtype_for(vocab)
    splits = {}
    for split, n in tokens.items():
        w = SplitWriter(out, split, dtype, chunk_len, chunks_per_shard=16)
        for lo in range(0, n, 1 << 24):  # bounded memory for the large corpus
            u = rng.random(min(n - lo, 1 << 24))
            w.write(np.minimum(np.searchsorted(cdf, u, side="right"), vocab - 1).astype(dtype))
        splits[split] = {**w.close(), "unk": 0, "oov": 0}
    WordTokenizer(["<eos>"] + [f"w{i}" for i in range(1, vocab)]).save(out / "vocab.json")
    manifest = {"format": FORMAT, "corpus": f"synthetic-zipf-{vocab}", "tokenizer": "word",
                "vocab_size": vocab, "dtype": dtype, "chunk_len": chunk_len,
                "sources": {s: {"file": "synthetic"} for s in tokens}, "splits": splits}
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return out


def corpus_sizes(plan: Plan, batch: int, bptt: int, eval_batch: int, steps: int) -> dict:
    """Enough train tokens that `steps` steps stay inside one epoch (windows up to bptt + 20),
    small valid/test splits (test runs at batch 1)."""
    per_stream = (steps + 2) * (bptt + 20) + 1
    return {"train": batch * per_stream, "valid": eval_batch * (4 * bptt + 1),
            "test": 2 * bptt + 1}


def common_overrides(plan: Plan, run_dir: Path, shards: Path, steps: int, every: int) -> dict:
    return {"data.shards": str(shards), "train.run_dir": str(run_dir),
            "train.max_steps": steps, "log.every_steps": every, "log.wandb_mode": "disabled",
            "log.progress": False, "checkpoint.every_steps": 0, "train.device": plan.device,
            **plan.tiny}


def metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []


def train_records(run_dir: Path) -> list[dict]:
    """The training-interval records of a run's metrics.jsonl (not validation, not events)."""
    return [r for r in metrics(run_dir) if "loss" in r and "tokens_per_s" in r]


def train_run(config: str, overrides: dict, hook=None) -> dict:
    """One real `Trainer(cfg).fit()`; `hook(trainer)` runs before fit. Returns the logged
    training losses, the last interval's tokens/s and the run's seconds."""
    from ...config import load_config
    from ...train.trainer import Trainer

    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    tr = Trainer(cfg)
    extra = hook(tr) if hook else None
    tr.fit()
    seconds = time.perf_counter() - t0
    recs = train_records(cfg.train.run_dir)
    out = {"rank": tr.rank, "world": tr.world, "losses": [r["loss"] for r in recs],
           "tokens_per_s": recs[-1]["tokens_per_s"] if recs else None, "seconds": seconds,
           "engine": cfg.dist.engine, "vocab": tr.vocab_size, "bf16": cfg.train.bf16,
           "extra": extra}
    del tr
    free()
    return out


def loss_down(label: str, losses: list[float]) -> dict:
    """The loss went down: the mean of the last quarter of the logged losses (at least the last
    one) is below the first. One interval alone is noisy (a single late interval of a healthy
    run can sit above the first); a quarter's mean is not, and a diverged or stuck run fails."""
    import math

    tail = losses[len(losses) - max(1, len(losses) // 4):]
    late = sum(tail) / len(tail) if tail else math.nan
    ok = len(losses) >= 2 and all(map(math.isfinite, losses)) and late < losses[0]
    return {"name": f"{label}: loss goes down (mean of the last quarter logged < first)",
            "value": late, "unit": "nats",
            "baseline": losses[0] if losses else None, "ok": ok, "losses": losses}
