"""The tiny configurations the tests train: one set of model sizes, the Trainer tests' config,
and the TOML recipes the CLI tests write."""

from __future__ import annotations

# A 2-layer model of 16/24 units on windows of 12 tokens: the size every tiny run trains.
TINY_MODEL = {"emb_size": 16, "hidden_size": 24, "n_layers": 2}
TINY_BPTT = 12


def tiny_config(run_dir, shards, **over):
    """The tiny model, 4 streams of bptt 12, 8 steps; regularizers off unless a test turns them
    on."""
    from dist_lm.config import load_config

    base = {"data.shards": str(shards), **{f"model.{k}": v for k, v in TINY_MODEL.items()},
            "model.dropout": 0.0, "model.dropouti": 0.0,
            "model.dropouth": 0.0, "model.dropoute": 0.0, "model.wdrop": 0.0,
            "train.global_batch": 4, "train.bptt": TINY_BPTT, "train.max_steps": 8,
            "train.seed": 141, "train.device": "cpu", "data.eval_batch_size": 2,
            "data.test_batch_size": 1, "log.every_steps": 1, "log.progress": False,
            "log.wandb_mode": "disabled", "checkpoint.every_steps": 0,
            "train.run_dir": str(run_dir), "optim.lr": 1.0}
    base.update(over)
    return load_config(None, base)


# The fault suite's recipe as a TOML file (momentum, the tiny model with its regularizers on,
# 4 streams); the corpus and run directory come as flags.
FAULT_TOML = """
[model]
emb_size = 16
hidden_size = 24
n_layers = 2
dropout = 0.2
dropouti = 0.1
dropouth = 0.1
wdrop = 0.2
[optim]
name = "momentum"
lr = 0.3
[train]
device = "cpu"
global_batch = 4
bptt = 12
seed = 141
[data]
eval_batch_size = 2
test_batch_size = 1
[log]
every_steps = 1
progress = false
wandb_mode = "disabled"
"""

# A recipe that options are checked against before anything starts (PTB preset, 20 steps).
OPTION_TOML = """
[data]
corpus = "ptb"
[model]
emb_size = 16
hidden_size = 32
n_layers = 1
[train]
device = "cpu"
global_batch = 10
bptt = 20
max_steps = 20
run_dir = "run"
[log]
progress = false
"""

# The sweep tests' two-parameter space (lr log-uniform in [5, 40], dropout in [0, 0.5]).
LR_DROPOUT = """
[space."optim.lr"]
type = "loguniform"
low = 5
high = 40
[space."model.dropout"]
type = "uniform"
low = 0.0
high = 0.5
"""
