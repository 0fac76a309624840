"""Options a user types outside a run config: `dist-lm eval`'s options (api.evaluate's
cache= / dynamic= dicts are the same sections) and a sweep's [study] table. They are read by
`parse.read_options` with the run config's coercion and checked by the same `checks.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
