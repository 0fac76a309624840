"""The trainer tests' subprocess entry: the real path, scaled down.

Every Trainer test runs the real RNNLanguageModel (dist_lm.models.build_model) on the real
StreamLoader over real WebDataset shards of a small slice of Penn Treebank (the benchmark
copy in ../shared/data), prepared by the real `prepare` (helpers.corpus.small_corpus).

    python tests/helpers/train_entry.py OUT data.shards=DIR train.run_dir=RUN key=value ...
        [resume=auto]

runs one `Trainer(...).fit()` (under torchrun for several ranks) and saves, per rank,
OUT.rank<r>.pt = {"params": final module state, "loader": the train loader's state}.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __name__ == "__main__":  # run as a script: the checkout and tests/ importable
    sys.path[0:1] = [str(Path(__file__).resolve().parents[2]),  # not tests/helpers itself
                    str(Path(__file__).resolve().parents[1])]

from helpers.config import tiny_config  # noqa: E402
from helpers.runs import make_trainer  # noqa: E402


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
    main(sys.argv[1:])
