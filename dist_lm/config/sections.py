"""The run config: one dataclass per section ([data], [model], [optim], [schedule], [train],
[dist], [log], [checkpoint], [search]) with its defaults, and the keys whose value is one of a
few choices. Every field has a docstring (the string literal under it), which `dist-lm train
--help` and the docs print (keys.flat_keys)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data.prepared import default_dir


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


CHOICES: dict[str, tuple[str, ...]] = {
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
