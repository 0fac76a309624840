"""The trainer tests' corpus, config and subprocess entry: the real path, scaled down.

Every Trainer test runs the real RNNLanguageModel (dist_lm.models.build_model) on the real
StreamLoader over real WebDataset shards of a small slice of Penn Treebank (the benchmark
copy in ../shared/data), prepared by the real `prepare` (text:DIR, vocabulary capped so the
softmax stays tiny on 2 cores).

    python tests/train_helpers.py OUT data.shards=DIR train.run_dir=RUN key=value ... [resume=auto]

runs one `Trainer(...).fit()` (under torchrun for several ranks) and saves, per rank,
OUT.rank<r>.pt = {"params": final module state, "loader": the train loader's state}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def small_corpus(root: Path, shared_data: Path, name: str = "ptb-slice", train_lines: int = 80,
                 eval_lines: int = 40, max_vocab: int = 200) -> Path:
    """The first lines of PTB's train/valid/test as a text:DIR corpus, prepared into shards of
    512 tokens (several shards per split, so reads cross shard boundaries)."""
    from dist_lm.data.prepare import prepare_corpus

    src = root / f"{name}-text"
    src.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train_lines), ("valid", eval_lines), ("test", eval_lines)):
        lines = (shared_data / "ptb" / f"ptb.{split}.txt").read_text().splitlines(True)[:n]
        (src / f"{split}.txt").write_text("".join(lines))
    return prepare_corpus(f"text:{src}", out=root / name, tokenizer="word", download=False,
                          workers=1, quiet=True, chunk_len=256, shard_tokens=512,
                          max_vocab=max_vocab)


def tiny_config(run_dir, shards, **over):
    """A 2-layer model of 16/24 units, 4 streams of bptt 12, 8 steps; regularizers off unless
    a test turns them on."""
    from dist_lm.config import load_config

    base = {"data.shards": str(shards), "model.emb_size": 16, "model.hidden_size": 24,
            "model.n_layers": 2, "model.dropout": 0.0, "model.dropouti": 0.0,
            "model.dropouth": 0.0, "model.dropoute": 0.0, "model.wdrop": 0.0,
            "train.global_batch": 4, "train.bptt": 12, "train.max_steps": 8,
            "train.seed": 141, "train.device": "cpu", "data.eval_batch_size": 2,
            "data.test_batch_size": 1, "log.every_steps": 1, "log.progress": False,
            "log.wandb_mode": "disabled", "checkpoint.every_steps": 0,
            "train.run_dir": str(run_dir), "optim.lr": 1.0}
    base.update(over)
    return load_config(None, base)


def make_trainer(cfg, **kwargs):
    from dist_lm.train.trainer import Trainer

    return Trainer(cfg, **kwargs)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def main(argv):
    torch.set_num_threads(1)
    out = argv[0]
    over = dict(kv.split("=", 1) for kv in argv[1:])
    resume = over.pop("resume", None)
    overwrite = over.pop("overwrite", "false") == "true"
    cfg = tiny_config(over.pop("train.run_dir"), over.pop("data.shards"), **over)
    tr = make_trainer(cfg)
    tr.fit(resume=resume, overwrite=overwrite)
    torch.save({"params": {k: v.detach().clone() for k, v in tr.module.state_dict().items()},
                "loader": tr.train_loader.state_dict()}, f"{out}.rank{tr.rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:])
