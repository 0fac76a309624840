"""Run configuration: nested dataclasses, a TOML file, and dotted command-line overrides.

Precedence is command line > file > defaults. Every field has a docstring (the string
literal under it), which `dist-lm train --help` and the docs point to. Unknown keys and
values of the wrong type are errors that name the key and suggest the closest valid one.

    cfg = load_config("configs/ptb_awd_lstm.toml", {"optim.lr": 30, "model.arch": "qrnn"})
    save_config(cfg, run_dir / "config.json")
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.prepared import default_dir
from .errors import UserError
from .fileio import write_text_atomic

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


@dataclass
class DataConfig:
    corpus: str = "ptb"
    """Corpus preset (ptb, ptb-char, wikitext-2, wikitext-103, enwik8, text8) or text:DIR."""
    shards: str = ""
    """Directory written by `dist-lm prepare` (holds manifest.json, vocab.json, tar shards).
    Empty means shards/<corpus>."""
    train_split: str = "train"
    """Split used for training."""
    valid_split: str = "valid"
    """Split used for validation (NT-ASGD trigger, plateau schedules, best model)."""
    test_split: str = "test"
    """Split reported as test perplexity at the end of training."""
    eval_batch_size: int = 10
    """Streams for validation (the reference protocol uses 10)."""
    test_batch_size: int = 1
    """Streams for test (the reference protocol uses 1)."""
    shard_url: str = ""
    """Read the shards from this WebDataset URL template instead of data.shards' local files,
    with {name} standing for a shard's file name, e.g. "pipe:aws s3 cp s3://bucket/ptb/{name} -"
    (manifest.json and vocab.json still come from data.shards)."""


@dataclass
class ModelConfig:
    arch: str = "lstm"
    """Recurrent layer type: lstm, qrnn, gru or cell (a searched cell, model.cell)."""
    emb_size: int = 400
    """Embedding size (also the last layer's output size when weights are tied)."""
    hidden_size: int = 1150
    """Hidden size of every layer but the last (the last has emb_size when tied)."""
    n_layers: int = 3
    """Number of recurrent layers."""
    tie_weights: bool = True
    """Share the embedding matrix with the softmax (Inan et al.; Press & Wolf)."""
    dropout: float = 0.4
    """Locked dropout on the output of the last layer."""
    dropouth: float = 0.25
    """Locked dropout between recurrent layers."""
    dropouti: float = 0.4
    """Locked dropout on the embedding output."""
    dropoute: float = 0.1
    """Embedding (word-type) dropout: drop whole rows of the embedding matrix."""
    wdrop: float = 0.5
    """DropConnect on the recurrent (hidden-to-hidden / gate) weights."""
    ar: float = 2.0
    """Activation regularization weight (alpha) on the dropped last-layer output."""
    tar: float = 1.0
    """Temporal activation regularization weight (beta) on the raw last-layer output."""
    head: str = "softmax"
    """Output head: softmax, adaptive (tied adaptive softmax), mos (mixture of softmaxes) or
    hierarchical (class-based two-level softmax)."""
    cutoffs: list[int] = field(default_factory=list)
    """Adaptive softmax cluster cutoffs; empty chooses them from the vocabulary size."""
    n_experts: int = 15
    """Mixture of softmaxes: number of experts."""
    mos_latent: int = 0
    """Mixture of softmaxes: latent size; 0 means emb_size."""
    dropoutl: float = 0.29
    """Mixture of softmaxes: locked dropout on the latent projection."""
    hsm_classes: int = 0
    """Hierarchical softmax: number of word classes (blocks of consecutive ids); 0: about sqrt(V)."""
    qrnn_window: int = 2
    """QRNN convolution window (1 or 2) for the first layer; later layers use 1."""
    zoneout: float = 0.0
    """QRNN zoneout on the forget gate."""
    cell: str = ""
    """model.arch=cell: the cell's genotype, one ACT:PRED per node, e.g. "tanh:0 relu:1 relu:1
    identity:2" (docs/search.md; `dist-lm search` writes one)."""


@dataclass
class OptimConfig:
    name: str = "sgd"
    """Optimizer: sgd, asgd (NT-ASGD: SGD with averaging), adam, adamw, amsgrad, rmsprop,
    adagrad, adadelta, momentum (SGD with momentum)."""
    lr: float = 30.0
    """Base learning rate (scaled per step by seq_len / bptt)."""
    weight_decay: float = 1.2e-6
    """L2 weight decay."""
    clip: float = 0.25
    """Gradient-norm clipping over all parameters; 0 disables."""
    momentum: float = 0.9
    """Momentum for the momentum optimizer and RMSprop."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas (the QRNN recipes use [0, 0.999])."""
    eps: float = 1e-8
    """Adam/RMSprop epsilon."""
    nt_asgd: bool = True
    """Switch SGD to averaged SGD when validation stops improving (non-monotone trigger)."""
    nonmono: int = 5
    """NT-ASGD non-monotone interval (validation checks)."""


@dataclass
class ScheduleConfig:
    kind: str = "constant"
    """Learning-rate schedule: constant, step, plateau, cosine or cyclic."""
    milestones: list[float] = field(default_factory=list)
    """Step decay points: epochs (values >= 1) or fractions of the run (values < 1)."""
    gamma: float = 0.1
    """Decay factor at each milestone / plateau."""
    patience: int = 0
    """Plateau schedule: validation checks without improvement before decaying."""
    scaling: str = ""
    """Large-batch lr rule for r = train.global_batch / schedule.base_batch: none (lr as
    given), linear (lr * r, Goyal et al. 2017), sqrt (lr * sqrt(r), You et al. 2019) or adascale
    (lr * the gain measured from the gradient noise scale, sqrt of it for adaptive optimizers,
    the schedule on progress tau += gain per step; Johnson et al. 2020; it needs the noise scale
    measured: train.noise_scale_every); empty: linear when schedule.base_batch is set (the old
    behaviour), else none. docs/scaling.md."""
    base_batch: int = 0
    """The global batch the recipe's lr is tuned for; 0: the config file's train.global_batch
    (before command-line overrides), so --train.global_batch=N on a recipe scales from it."""
    warmup_steps: int = -1
    """Linear warmup steps from 0 to the (scaled) peak learning rate; -1 derives them from the
    batch ratio and schedule.warmup_base_steps (none when the lr is not raised)."""
    warmup_base_steps: int = 100
    """Derived warm-up (schedule.warmup_steps = -1) when a rule raises the lr (r > 1): sqrt
    warms up over this many steps (r times its tokens), linear over ceil(this / r) steps (the
    same tokens); see docs/scaling.md."""
    min_lr: float = 0.0
    """Lower bound for cosine, cyclic and plateau schedules."""
    cycle_steps: int = 2000
    """Cyclic schedule: steps per half cycle."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    """Where the run writes config.json, metrics.jsonl, checkpoints/ and results."""
    seed: int = 141
    """Seed for parameters, the shared BPTT generator and the per-rank dropout generators."""
    epochs: int = 750
    """Training epochs (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 means train by epochs."""
    max_seconds: float = 0.0
    """Stop after this much wall-clock training time (validation and checkpoints included,
    summed over resumes); 0 means no limit. Schedules then progress by the clock."""
    global_batch: int = 80
    """Total number of streams over all ranks (AWD-LSTM's batch_size)."""
    micro_batch: int = 0
    """Streams per rank per forward pass (the rest is gradient accumulation); 0 chooses the
    largest divisor of global_batch / world_size whose windows fit train.max_micro_tokens."""
    max_micro_tokens: int = 0
    """Cap on the tokens of one forward pass (micro batch x longest window) when
    train.micro_batch = 0; 0: 16384 on CPU, 65536 on CUDA; -1: no cap (one pass per rank)."""
    bptt: int = 70
    """Base truncated-BPTT window length."""
    variable_bptt: bool = True
    """Draw window lengths as AWD-LSTM does (0.95 base else half, normal sd 5, min 5)."""
    max_seq_len: int = 0
    """Cap on drawn window lengths; 0 means base bptt + 20 (keeps memory bounded)."""
    eval_every_steps: int = 0
    """Validate every N steps; 0 means once per epoch."""
    device: str = "auto"
    """cpu, cuda or auto (cuda when available)."""
    bf16: bool = False
    """bf16 autocast for the matmul-heavy parts (DeepSpeed: its bf16 mode). LSTM layers keep
    fp32 (see docs/training.md, "Precision"); averages and loss sums stay fp32."""
    compile: bool = False
    """torch.compile the model (dynamic shapes: one compile for every BPTT length; the LSTM
    kernel itself is left uncompiled). Local and DDP engines."""
    tf32: bool = True
    """TF32 for fp32 matmuls and cuDNN on CUDA (Ampere and newer): several times the fp32
    matmul rate at about 1e-3 relative precision. No effect on CPU."""
    finetune: bool = False
    """Finetune stage: averaged SGD from the start, stop at the first non-monotone validation."""
    finetune_from: str = ""
    """Checkpoint (run dir or step dir) whose weights start the finetune stage."""
    baseline_tokens_per_s: float = 0.0
    """Single-device tokens/s of this model, micro-batch, bptt and dtype, for the scaling
    efficiency of multi-rank runs; 0 looks it up in the baselines file (recorded by `dist-lm
    bench train` or a run with train.record_baseline)."""
    record_baseline: bool = False
    """Record this single-device run's median tokens/s as the baseline for its model,
    vocabulary, micro-batch, bptt, dtype and device kind (the baselines file)."""
    target_ppl: float = 0.0
    """Stop when validation perplexity reaches this value (word corpora); 0 disables. The
    wall-clock time and tokens it took are recorded (time to target)."""
    target_bpc: float = 0.0
    """Stop when validation bits per character reach this value (character corpora)."""
    max_bad_steps: int = 10
    """A step whose loss or gradient norm is NaN/inf is not applied (counted and logged); after
    this many in a row the run stops, naming the last good checkpoint. -1 turns the check off
    (it costs one host sync per step)."""
    noise_scale_every: int = -1
    """Measure the gradient noise scale B_noise every N optimizer steps (logged as b_noise in
    streams, b_noise_tokens and the AdaScale gain adascale_gain; docs/training.md, "Gradient
    noise scale"); it needs two micro batches per step (accumulation or several ranks) and the
    local or DDP engine. 0: off; -1: every step where it can be measured, else off."""


@dataclass
class DistConfig:
    engine: str = "local"
    """local (one device), ddp (torchrun) or deepspeed."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on GPU, gloo on CPU), nccl or gloo."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0, 1 or 2)."""


@dataclass
class LogConfig:
    every_steps: int = 200
    """Console/JSONL/W&B logging interval in optimizer steps."""
    wandb_mode: str = "offline"
    """online, offline or disabled (the WANDB_MODE environment variable wins)."""
    project: str = "dist-lm"
    """W&B project."""
    group: str = ""
    """W&B group (e.g. one sweep)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    name: str = ""
    """W&B run name; empty uses the run directory's name."""
    progress: bool = True
    """Show a tqdm progress bar on rank 0."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N optimizer steps; 0 saves at the end of every epoch only."""
    keep_last: int = 3
    """Keep this many most recent complete checkpoints (the best one is kept as well)."""


@dataclass
class SearchConfig:
    n_nodes: int = 12
    """Architecture search (`dist-lm search`): nodes per cell (ENAS: 12)."""
    rounds: int = 10
    """Search rounds; each trains the shared weights, then the controller."""
    shared_steps: int = 200
    """Shared-weight optimizer steps per round on the training stream, each with a newly
    sampled cell (ENAS: one epoch)."""
    controller_steps: int = 50
    """Controller steps per round: one sampled cell scored on the next validation window each
    (ENAS: 2000)."""
    max_seconds: float = 0.0
    """Stop the search (then derive) after this much wall-clock time, summed over resumes;
    0 means no limit."""
    controller_hidden: int = 100
    """Controller LSTM size (ENAS: 100)."""
    controller_lr: float = 3.5e-4
    """Controller Adam learning rate (ENAS: 3.5e-4)."""
    temperature: float = 5.0
    """Controller logits are divided by this before the tanh squash (ENAS: 5)."""
    tanh_constant: float = 2.5
    """Controller logits become tanh_constant * tanh(logits) (ENAS: 2.5); 0 turns it off."""
    entropy_weight: float = 1e-4
    """Entropy bonus weight in the controller's REINFORCE loss (ENAS: 1e-4)."""
    baseline_decay: float = 0.99
    """Decay of the exponential moving average reward baseline (ENAS: 0.99)."""
    reward_c: float = 80.0
    """Reward = reward_c / validation perplexity of the sampled cell (ENAS: 80)."""
    derive_samples: int = 20
    """Cells sampled from the trained controller (or uniformly, search.random) at the end;
    the best on validation, with the shared weights, is the found cell."""
    derive_windows: int = 0
    """Validation windows each derived cell is scored on; 0 means the whole split."""
    random: bool = False
    """Random-search baseline: cells sampled uniformly from the space everywhere (shared
    training and derive), no controller learning; same budget."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def shards_dir(self) -> Path:
        """The prepared corpus directory for this config."""
        return Path(self.data.shards) if self.data.shards else default_dir(self.data.corpus)


# ---- Options a user types outside a run config: `dist-lm eval`'s options (api.evaluate's
# cache= / dynamic= dicts are the same sections) and a sweep's [study] table. They are read by
# `read_options` with the run config's coercion and checked by the same `validate`.


@dataclass
class CacheOptions:
    """Neural cache pointer (dist_lm/eval/cache.py); pointer.py's PTB values as defaults."""
    window: int = 500
    """Cache size: the hidden states of this many previous tokens."""
    theta: float = 1.0
    """Flatness of the cache distribution (scales the similarity scores)."""
    lambdah: float = 0.1
    """Weight of the cache distribution in the mixture with the model's."""
    normalize: bool = False
    """Cosine similarity instead of the dot product."""
    search: bool = False
    """Grid search theta x lambdah on the validation split first."""


@dataclass
class DynamicOptions:
    """Dynamic evaluation (dist_lm/eval/dynamic.py); Krause et al.'s values as defaults."""
    lr: float = 5e-5
    """Learning rate of the adaptation steps."""
    decay: float = 2e-3
    """Decay of the adapted weights back to the trained ones."""
    eps: float = 2e-5
    """Added to the gradient statistics (RMS normalisation)."""
    bptt: int = 5
    """Segment length: the model adapts after every segment."""
    stat_batch: int = 100
    """Streams for the gradient statistics on the training split."""
    stat_batches: int = 0
    """Windows for the statistics; 0 means the whole training split."""
    search: bool = False
    """Grid search lr x decay on the validation split first."""
    search_tokens: int = 30000
    """Validation tokens per grid point (0: all; Krause et al.'s gridfast)."""


@dataclass
class EvalOptions:
    """`dist-lm eval`'s options after the run path (--bptt, --cache.window, ...)."""
    bptt: int = 0
    """Window length; 0 means the run's train.bptt."""
    corpus: str = ""
    """A prepared corpus directory to evaluate on instead of the run's (same vocabulary)."""
    device: str = "cpu"
    """cpu, cuda or auto."""
    averaged: bool = True
    """Evaluate the NT-ASGD averaged weights where the checkpoint holds them."""
    checkpoint: str = "best"
    """best, latest or step-N."""
    cache: CacheOptions | None = None
    """Neural cache (--cache alone: the defaults; any --cache.KEY turns it on)."""
    dynamic: DynamicOptions | None = None
    """Dynamic evaluation (--dynamic alone: the defaults; any --dynamic.KEY turns it on)."""


OBJECTIVES = ("valid", "valid_ppl", "valid_bpc", "valid_loss")
BUDGETS = {"steps": "train.max_steps", "epochs": "train.epochs", "seconds": "train.max_seconds"}


@dataclass
class StudyConfig:
    """A study file's [study] table (dist_lm/sweep/space.py reads the rest of the file)."""
    name: str = ""
    """Study name in the storage (also the trials' W&B group)."""
    base: str = ""
    """The recipe TOML every trial starts from."""
    objective: str = "valid"
    """Minimised metric of the final validation: valid, valid_ppl, valid_bpc or valid_loss."""
    trials: int = 20
    """Number of trials in the study (all workers and machines together)."""
    budget: dict = field(default_factory=dict)
    """Per-trial bound (required): { steps = N } | { epochs = N } | { seconds = S }."""
    eval_every_steps: int = 0
    """Validation interval (the pruner's intermediate values)."""
    sampler: str | dict = "tpe"
    """A name, tpe (default) or random, or a table { kind = "tpe", seed = 1, ... }."""
    pruner: str | dict = "median"
    """A name, median (default), none, percentile, halving or hyperband, or a table."""
    storage: str = ""
    """Empty: STUDY_DIR/study.journal; a journal file path; or an SQLAlchemy URL."""
    workers: int = 1
    """Trials run at once by one `dist-lm sweep` process."""
    launcher: str = ""
    """Command that runs `-m dist_lm train ...`, e.g. "torchrun --standalone --nproc_per_node
    2" (default: this Python)."""
    retries: int = 2
    """Times an interrupted trial is re-queued."""
    heartbeat: int = 60
    """Seconds between heartbeats of a running trial (RDB storages)."""


_CHOICES: dict[str, tuple[str, ...]] = {
    "model.arch": ("lstm", "qrnn", "gru", "cell"),
    "model.head": ("softmax", "adaptive", "mos", "hierarchical"),
    "optim.name": ("sgd", "asgd", "adam", "adamw", "amsgrad", "rmsprop", "adagrad",
                   "adadelta", "momentum"),
    "schedule.kind": ("constant", "step", "plateau", "cosine", "cyclic"),
    "dist.engine": ("local", "ddp", "deepspeed"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "log.wandb_mode": ("online", "offline", "disabled"),
    "train.device": ("auto", "cpu", "cuda"),
}


def _resolve(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


# Flags of the reference implementations (salesforce/awd-lstm-lm, its QRNN and MoS forks)
# whose dist-lm key is not the closest spelling: --model.nhid is hidden_size, not head.
ALIASES = {"nhid": "hidden_size", "emsize": "emb_size", "nlayers": "n_layers",
           "batch_size": "global_batch", "wdecay": "weight_decay", "alpha": "ar", "beta": "tar",
           "optimizer": "name", "when": "milestones", "save": "run_dir", "model": "arch",
           "log_interval": "every_steps"}


@dataclass(frozen=True)
class Keys:
    """How a family of options is named in its messages: the noun and the key as the user
    writes it ('optim.lr' in a config file or --optim.lr; --cache.window on `dist-lm eval`'s
    command line; 'window' in api.evaluate's cache dict; 'trials' in a study's [study])."""
    noun: str
    flag: bool = False
    """Written as --key on a command line (else quoted: 'key')."""
    help: str = ""
    """Where every key is listed, named when a misspelt key is close to none of them."""

    def show(self, key: str) -> str:
        return f"--{key}" if self.flag else f"'{key}'"


CONFIG_KEYS = Keys("config key", help="`dist-lm train --help` lists every key.")
EVAL_KEYS = Keys("eval option", flag=True)
STUDY_KEYS = Keys("[study] key")
_WANTS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          dict: "a table", list: "a list"}


def suggest(name: str, options: list[str]) -> str | None:
    """The option meant by a misspelt dotted key (or bare field name): a known alias of its
    field, the key whose field is spelt the same (`lr` -> `optim.lr`), else the closest
    spelling of the field (in the section the user wrote, if it has one close enough, else in
    any section); None when nothing is close."""
    field_of = {o: o.rsplit(".", 1)[-1] for o in options}
    last = name.rsplit(".", 1)[-1].replace("-", "_")
    section = name.rsplit(".", 1)[0] if "." in name else ""
    for want in (ALIASES.get(last), last):
        same = [o for o, f in field_of.items() if f == want]
        if same:  # the section the user wrote first, when it has that field
            return next((o for o in same if o.startswith(section + ".")), same[0])
    # the field's spelling alone: a shared "model." would make any two model keys look alike
    ranked = sorted(options, key=lambda o: (not o.startswith(section + "."),
                                            -difflib.SequenceMatcher(None, last,
                                                                     field_of[o]).ratio()))
    best = ranked[0] if ranked else None
    if best and difflib.SequenceMatcher(None, last, field_of[best]).ratio() >= 0.6:
        return best
    return None


def closest(name: str, options: list[str], keys: Keys | None = None) -> str:
    """' Did you mean X?' for a misspelt key, else where the valid keys are listed."""
    keys = keys or CONFIG_KEYS
    match = suggest(name, options)
    if match:
        return f" Did you mean {keys.show(match)}?"
    if keys.help and len(options) > 12:
        return f" {keys.help}"
    return f" Valid keys: {', '.join(sorted(keys.show(o) for o in options))}."


def coerce(key: str, value: Any, hint: Any, keys: Keys | None = None) -> Any:
    """Convert `value` (from TOML, fire or a keyword argument) to the field's type, or raise
    UserError naming the key as `keys` writes it (config key 'train.bptt', --cache.window)."""
    keys = keys or CONFIG_KEYS
    what = f"{keys.noun} {keys.show(key)}"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # e.g. str | dict: the first type that fits
        for arm in typing.get_args(hint):
            try:
                return coerce(key, value, arm, keys)
            except UserError:
                pass
        wants = " or ".join(_WANTS.get(a, str(a)) for a in typing.get_args(hint))
        raise UserError(f"{what} expects {wants}, got {value!r}.")
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise UserError(f"{what} expects a table, got {value!r}.")
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    raise UserError(f"{what}: cannot parse {value!r} as a list; "
                                    f"write it like [1, 2, 3].") from None
            else:
                value = [v for v in text.split(",") if v.strip()]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise UserError(f"{what} expects a list, got {value!r}; "
                            f"write it like [1, 2, 3].")
        return [coerce(key, v, item, keys) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise UserError(f"{what} expects true or false, got {value!r}.")
    if hint is int:
        if isinstance(value, bool):
            raise UserError(f"{what} expects an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise UserError(f"{what} expects an integer, got {value!r}.")
    if hint is float:
        if isinstance(value, bool):
            raise UserError(f"{what} expects a number, got {value!r}.")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and not math.isfinite(number):  # NaN passes every > and < test
            raise UserError(f"{what} expects a finite number, got {value!r}.")
        if number is not None:
            return number
        raise UserError(f"{what} expects a number, got {value!r}.")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{what} expects a string, got {value!r}.")
    raise TypeError(f"unsupported option type {hint!r} for {key}")  # a bug in this file


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted run-config key, its value coerced to the field's type and checked against
    the key's choices; an unknown section or key names the closest valid one."""
    parts = key.split(".")
    sections = [f.name for f in dataclasses.fields(Config)]
    if len(parts) != 2:
        all_keys = list(flat_keys())
        raise UserError(f"config key '{key}' must look like section.field "
                        f"(e.g. optim.lr).{closest(key, all_keys)}")
    section, name = parts
    if section not in sections:
        raise UserError(f"unknown config section '{section}' in '{key}'."
                        f"{closest(section, sections)}")
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if name not in hints:
        raise UserError(f"unknown config key '{key}'.{closest(key, list(flat_keys()))}")
    coerced = coerce(key, value, hints[name])
    choices = _CHOICES.get(key)
    if choices and coerced not in choices:
        raise UserError(f"config key '{key}' must be one of {', '.join(choices)}; got {coerced!r}.")
    setattr(obj, name, coerced)


def _section_type(hint: Any) -> type | None:
    """The dataclass a field's type names (also `X | None`: a section off until set)."""
    return next((a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)),
                None)


def option_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the option dataclass `cls` with its type (a field that is itself a
    dataclass is a section of keys, as the run config's are)."""
    out: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(cls).items():
        section = _section_type(hint)
        if section is not None:
            out.update(option_types(section, f"{prefix}{name}."))
        else:
            out[prefix + name] = hint
    return out


def read_options(cls: type, table: dict[str, Any], keys: Keys, obj: Any = None) -> Any:
    """`table` (nested or dotted keys: a TOML table, fire's options, keyword arguments) as an
    instance of the option dataclass `cls` (or set on `obj`): every key checked against its
    fields, the closest valid key named for a misspelt one, every value coerced to its
    field's type, then `validate`d. Naming a key of an optional section turns it on."""
    hints = option_types(cls)
    obj = cls() if obj is None else obj
    for key, value in _leaves(table, hints).items():
        if key not in hints:
            raise UserError(f"unknown {keys.noun} {keys.show(key)}."
                            f"{closest(key, list(hints), keys)}")
        *path, name = key.split(".")
        target = obj
        for part in path:
            if getattr(target, part) is None:
                hint = typing.get_type_hints(type(target))[part]
                setattr(target, part, _section_type(hint)())
            target = getattr(target, part)
        setattr(target, name, coerce(key, value, hints[key], keys))
    validate(obj)
    return obj


def _leaves(table: dict, hints: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`flatten`, but a table given to a field that takes one (a study's budget) stays whole."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = prefix + str(k).replace("-", "_")
        if isinstance(v, dict) and key not in hints:
            out.update(_leaves(v, hints, key + "."))
        else:
            out[key] = v
    return out


def flat_keys() -> dict[str, str]:
    """All dotted keys with their docstrings (used for help text and error suggestions)."""
    docs = _field_docs()
    out = {}
    for sec in dataclasses.fields(Config):
        cls = _resolve(Config, sec.name)
        for f in dataclasses.fields(cls):
            out[f"{sec.name}.{f.name}"] = docs.get((cls.__name__, f.name), "")
    return out


def _field_docs() -> dict[tuple[str, str], str]:
    """Read the string literal under each dataclass field from this file's source."""
    import ast

    tree = ast.parse(Path(__file__).read_text())
    docs: dict[tuple[str, str], str] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            body = node.body
            for a, b in zip(body, body[1:]):
                if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
                        and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
                        and isinstance(b.value.value, str)):
                    docs[(node.name, a.target.id)] = " ".join(b.value.value.split())
    return docs


def flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """A nested table ({"optim": {"lr": 30}}) as dotted keys ({"optim.lr": 30})."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_config(path: str | os.PathLike | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file at `path`, then dotted `overrides` (e.g. {'optim.lr': 30})."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if p.is_dir():
            tomls = sorted(p.glob("*.toml"))[:3]
            example = ", ".join(str(t) for t in tomls) or "configs/cpu_smoke.toml"
            raise UserError(f"config file {p} is a directory; pass a TOML file such as "
                            f"{example}.")
        if not p.is_file():
            hint = ""
            if not p.suffix:
                cand = Path("configs") / f"{p.name}.toml"
                if cand.is_file():
                    hint = f" Did you mean {cand}?"
            raise UserError(f"config file {p} does not exist.{hint} "
                            f"Pass a TOML file such as configs/cpu_smoke.toml.")
        try:
            table = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"config file {p} is not valid TOML: {exc}. Fix the file.") from None
        for key, value in flatten(table).items():
            set_key(cfg, key, value)
    # key -> 1 file, 2 CLI. A file's key counts only where it differs from the default: a
    # config written out whole (a search's cell.toml, a run's config) holds every key, and
    # its default warm-up keys say nothing about which one the user meant.
    defaults = flatten(to_dict(Config()))
    given = {k: 1 for k, v in flatten(table).items()
             if k not in defaults or defaults[k] != v} if path is not None else {}
    file_batch = cfg.train.global_batch  # the recipe's, before command-line overrides
    for key, value in (overrides or {}).items():
        key = key.replace("-", "_") if "." in key else key
        set_key(cfg, key, value)
        given[key] = 2
    validate(cfg)
    _resolve_scaling_keys(cfg, file_batch, given)
    return cfg


def _resolve_scaling_keys(cfg: Config, file_batch: int, given: dict[str, int]) -> None:
    """Make the large-batch keys explicit (config.json then records what the run used) and
    refuse the combinations that contradict each other. schedule.base_batch 0 becomes the
    config file's train.global_batch (the recipe's: a user moving it from 1 GPU to 8 raises
    train.global_batch and expects the lr to scale from the recipe). schedule.scaling unset
    keeps the old meaning: linear when schedule.base_batch was set (with warm-up only when
    schedule.warmup_steps gives it), else none. `given`: where each key was set (1 the file,
    2 the command line); the command line wins over the file, a contradiction within one of
    them is refused."""
    s = cfg.schedule
    fixed = given.get("schedule.warmup_steps", 0)
    derive = given.get("schedule.warmup_base_steps", 0)
    if fixed and fixed == derive and s.warmup_steps >= 0:
        raise UserError("schedule.warmup_steps and schedule.warmup_base_steps are both set: "
                        "warmup_steps fixes the warm-up, warmup_base_steps derives it from the "
                        "batch ratio; drop one of them.")
    if derive > fixed:  # e.g. the file fixes the warm-up, the command line asks to derive it
        s.warmup_steps = -1
    if not s.scaling:
        if s.base_batch > 0:
            s.scaling = "linear"
            if s.warmup_steps < 0 and not derive:
                s.warmup_steps = 0  # exactly what base_batch alone did before
        else:
            s.scaling = "none"
    if s.scaling == "none" and derive and derive >= given.get("schedule.scaling", 0):
        raise UserError("schedule.warmup_base_steps derives the warm-up of a raised lr, and "
                        "schedule.scaling is none, which raises nothing; set "
                        "--schedule.scaling=linear or sqrt, or give a plain warm-up with "
                        "--schedule.warmup_steps=N.")
    if s.base_batch == 0:
        s.base_batch = file_batch

def wandb_credentials() -> str | None:
    """Where wandb would find an API key without prompting (the same places wandb.login reads:
    $WANDB_API_KEY or an identity-token file, the netrc entry of the W&B host, an api_key in
    the settings file), or None. Read here with the standard library: wandb's own lookup is
    private API that moves between releases, and importing wandb costs seconds."""
    import netrc
    from urllib.parse import urlparse

    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(var):
            return f"${var}"
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        if netrc.netrc(str(path)).authenticators(host or ""):
            return str(path)
    except (OSError, netrc.NetrcParseError):
        pass
    conf = Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser()
    try:
        if "api_key" in (conf / "settings").read_text(errors="replace"):
            return str(conf / "settings")
    except OSError:
        pass
    return None


def check_corpus(cfg: Config) -> None:
    """A misspelt data.corpus with nothing prepared under its name: name the closest preset
    (the trainer would say `dist-lm prepare ptbb`, which prepare refuses in turn)."""
    from .data.corpora import PRESETS

    d = cfg.data
    if d.shards or d.corpus in PRESETS or d.corpus.startswith("text:"):
        return
    if (cfg.shards_dir() / "manifest.json").is_file():  # a corpus prepared under that name
        return
    match = difflib.get_close_matches(d.corpus, list(PRESETS), n=1, cutoff=0.5)
    hint = f" Did you mean --data.corpus={match[0]}?" if match else ""
    raise UserError(f"data.corpus '{d.corpus}' is not a corpus preset ({', '.join(PRESETS)}) "
                    f"and {cfg.shards_dir()} holds no prepared corpus.{hint} Use a preset, "
                    f"text:DIR, or set data.shards to a directory written by `dist-lm prepare`.")


def check_wandb_login(cfg: Config) -> None:
    """Online W&B without credentials: wandb.init waits for its login prompt to time out
    (about 100 s), then raises; refuse before anything is started or written."""
    mode = os.environ.get("WANDB_MODE") or cfg.log.wandb_mode
    if mode == "online" and wandb_credentials() is None:
        raise UserError("log.wandb_mode is online but no W&B login was found (no $WANDB_API_KEY, "
                        "no api.wandb.ai entry in ~/.netrc); run `wandb login` first, or pass "
                        "--log.wandb_mode=offline and upload later with `wandb sync`.")


def validate(cfg: Config | EvalOptions | CacheOptions | DynamicOptions | StudyConfig) -> None:
    """Refuse values nothing could use, naming the key to change (one line, one wording for
    every option group: a run config with its search section, eval options, a [study])."""
    if not isinstance(cfg, Config):
        _CHECKS[type(cfg)](cfg)
        return
    t, m = cfg.train, cfg.model
    if t.global_batch < 1:
        raise UserError("train.global_batch must be >= 1.")
    if t.micro_batch < 0:
        raise UserError("train.micro_batch must be >= 0 (0 means global_batch / world_size).")
    if t.bptt < 2:
        raise UserError("train.bptt must be >= 2.")
    for name in ("emb_size", "hidden_size", "n_layers", "n_experts"):
        if getattr(m, name) < 1:
            raise UserError(f"model.{name} must be >= 1; got {getattr(m, name)}.")
    for name in ("mos_latent", "hsm_classes"):
        if getattr(m, name) < 0:
            raise UserError(f"model.{name} must be >= 0 (0 chooses it); got {getattr(m, name)}.")
    for name in ("dropout", "dropouth", "dropouti", "dropoute", "wdrop", "zoneout", "dropoutl"):
        v = getattr(m, name)
        if not 0.0 <= v < 1.0:
            raise UserError(f"model.{name} must be in [0, 1); got {v}.")
    if m.qrnn_window not in (1, 2):
        raise UserError(f"model.qrnn_window must be 1 or 2; got {m.qrnn_window}.")
    if cfg.dist.zero_stage not in (0, 1, 2):
        raise UserError(f"dist.zero_stage must be 0, 1 or 2; got {cfg.dist.zero_stage} (stage 3 "
                        f"partitions the parameters themselves, which model.pt and NT-ASGD "
                        f"averaging need whole; recurrent LMs of this size fit per device).")
    for m_ in cfg.schedule.milestones:
        if m_ <= 0 or (m_ >= 1 and not float(m_).is_integer()):
            raise UserError(f"schedule.milestones: {m_} is neither a whole epoch (>= 1) nor a "
                            f"fraction of the run (0 < m < 1); e.g. [12, 18] or [0.5, 0.75].")
    if t.max_seconds < 0 or t.max_steps < 0 or t.epochs < 0:
        raise UserError("train.max_seconds, train.max_steps and train.epochs must be >= 0.")
    if t.epochs == 0 and t.max_steps == 0:  # the run would stop before its first step
        raise UserError("train.epochs = 0 with train.max_steps = 0 trains nothing; set "
                        "train.epochs >= 1 or train.max_steps >= 1.")
    if cfg.optim.clip < 0:
        raise UserError(f"optim.clip must be >= 0 (0 turns clipping off); got {cfg.optim.clip}.")
    if cfg.optim.lr <= 0:
        raise UserError(f"optim.lr must be > 0; got {cfg.optim.lr}.")
    s = cfg.schedule
    if s.scaling not in ("", "none", "linear", "sqrt", "adascale"):
        raise UserError(f"schedule.scaling must be none, linear, sqrt or adascale; got "
                        f"{s.scaling!r}.")
    if s.scaling == "adascale" and (cfg.dist.engine == "deepspeed" or t.noise_scale_every == 0):
        raise UserError("schedule.scaling=adascale reads the measured gradient noise scale, which "
                        + ("DeepSpeed does not give; use --dist.engine=ddp or local"
                           if cfg.dist.engine == "deepspeed" else
                           "train.noise_scale_every=0 turns off; drop it or set it to N > 0")
                        + ", or pick another --schedule.scaling.")
    if s.base_batch < 0:
        raise UserError(f"schedule.base_batch must be >= 0 (0: the config file's "
                        f"train.global_batch); got {s.base_batch}.")
    if s.warmup_steps < -1 or s.warmup_base_steps < 0:
        raise UserError(f"schedule.warmup_steps must be >= 0 (or -1: derived) and "
                        f"schedule.warmup_base_steps >= 0; got {s.warmup_steps} and "
                        f"{s.warmup_base_steps}.")
    if t.noise_scale_every < -1:
        raise UserError(f"train.noise_scale_every must be N > 0 (every N steps), 0 (off) or -1 "
                        f"(every step where it can be measured); got {t.noise_scale_every}.")
    if t.noise_scale_every > 0 and cfg.dist.engine == "deepspeed":
        raise UserError("train.noise_scale_every needs dist.engine=local or ddp: DeepSpeed "
                        "reduces, clips and steps in one call, with no norm of the whole unclipped "
                        "gradient to read; drop --train.noise_scale_every or use "
                        "--dist.engine=ddp.")
    if t.max_micro_tokens < -1:
        raise UserError(f"train.max_micro_tokens must be > 0, 0 (the device's default) or -1 (no "
                        f"cap); got {t.max_micro_tokens}.")
    _check_search(cfg.search)
    check_corpus(cfg)
    check_wandb_login(cfg)


def _need(ok: bool, key: str, rule: str, value: Any) -> None:
    """One refused value, in the wording every check shares."""
    if not ok:
        raise UserError(f"{key} must be {rule}; got {value!r}.")


def _check_search(s: SearchConfig) -> None:
    _need(s.n_nodes >= 1, "search.n_nodes", ">= 1", s.n_nodes)
    _need(s.derive_samples >= 1, "search.derive_samples", ">= 1", s.derive_samples)
    for name in ("rounds", "shared_steps", "controller_steps", "derive_windows", "max_seconds",
                 "temperature", "tanh_constant", "entropy_weight"):
        _need(getattr(s, name) >= 0, f"search.{name}", ">= 0", getattr(s, name))
    for name in ("controller_hidden", "controller_lr", "reward_c"):
        _need(getattr(s, name) > 0, f"search.{name}", "> 0", getattr(s, name))
    _need(0.0 <= s.baseline_decay < 1.0, "search.baseline_decay", "in [0, 1)", s.baseline_decay)


def _check_cache(c: CacheOptions) -> None:  # named as `dist-lm eval` spells them
    _need(c.window >= 1, "--cache.window", ">= 1", c.window)
    _need(c.theta >= 0, "--cache.theta", ">= 0", c.theta)
    _need(0 <= c.lambdah <= 1, "--cache.lambdah", "in [0, 1]", c.lambdah)


def _check_dynamic(d: DynamicOptions) -> None:
    _need(d.bptt >= 1, "--dynamic.bptt", ">= 1", d.bptt)
    _need(d.stat_batch >= 1, "--dynamic.stat_batch", ">= 1", d.stat_batch)
    _need(d.lr >= 0, "--dynamic.lr", ">= 0", d.lr)
    _need(d.decay >= 0, "--dynamic.decay", ">= 0", d.decay)


def _check_eval(e: EvalOptions) -> None:
    if e.cache is not None and e.dynamic is not None:
        raise UserError("use either the cache (--cache.*) or dynamic evaluation (--dynamic.*), "
                        "not both in one command.")
    if e.cache is not None:
        _check_cache(e.cache)
    if e.dynamic is not None:
        _check_dynamic(e.dynamic)


def _check_study(st: StudyConfig) -> None:
    for key in ("name", "base"):
        if not getattr(st, key):
            doc = _field_docs()[("StudyConfig", key)].rstrip(".")
            raise UserError(f"study.{key} is required ({doc[0].lower()}{doc[1:]}).")
    if st.objective not in OBJECTIVES:
        raise UserError(f"study.objective must be one of {', '.join(OBJECTIVES)}; got "
                        f"{st.objective!r}.{closest(st.objective, list(OBJECTIVES), STUDY_KEYS)}")
    for key in ("trials", "workers", "heartbeat"):
        _need(getattr(st, key) >= 1, f"study.{key}", "an integer >= 1", getattr(st, key))
    for key in ("retries", "eval_every_steps"):
        _need(getattr(st, key) >= 0, f"study.{key}", "an integer >= 0", getattr(st, key))
    b = st.budget
    if len(b) != 1 or next(iter(b)) not in BUDGETS:
        raise UserError(f"study.budget must be one of {{ steps = N }}, {{ epochs = N }} or "
                        f"{{ seconds = S }}; got {b!r}.")
    (kind, amount), = b.items()  # typed here: the one table whose values are not fields
    b[kind] = coerce(f"budget.{kind}", amount, float if kind == "seconds" else int, STUDY_KEYS)
    _need(b[kind] > 0, f"study.budget.{kind}",
          f"a positive {'number' if kind == 'seconds' else 'integer'}", b[kind])


_CHECKS = {EvalOptions: _check_eval, CacheOptions: _check_cache,
           DynamicOptions: _check_dynamic, StudyConfig: _check_study}


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


RESOLVED = "resolved"  # config.json's block of values the trainer derived (lr rule, micro batch)


def from_dict(table: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a run's config.json)."""
    cfg = Config()
    for key, value in flatten(table).items():
        if key.split(".")[0] == RESOLVED:
            continue  # what the trainer derived (not config keys): see Trainer._write_resolved
        set_key(cfg, key, value)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as JSON (temporary name, then rename)."""
    write_text_atomic(path, json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def help_text() -> str:
    """Every config key with its default and docstring, for --help."""
    defaults = flatten(to_dict(Config()))
    lines = []
    for key, doc in flat_keys().items():
        lines.append(f"  --{key}={defaults[key]!r}\n      {doc}")
    return "\n".join(lines)


def check_main(argv: list[str]) -> None:
    """`python -c 'from dist_lm.config import check_main; ...' CONFIG [--overrides]`: load the
    config as `dist-lm train CONFIG [--overrides]` would (fire parses the same signature) and
    exit 2 with the one-line error if it is refused. launch/torchrun.sh runs it once before
    torchrun, whose elastic restarts would otherwise repeat a permanent error on every rank."""
    import fire

    def train(config: str, resume: str | None = None, overwrite: bool = False,
              **overrides) -> None:
        load_config(config, overrides)

    try:
        fire.Fire(train, command=argv, name="dist-lm train")
    except UserError as exc:
        print(f"dist-lm: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
