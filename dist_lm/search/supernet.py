"""The shared-weight supernet: the model.arch=cell language model whose cell layers hold one
matrix per (node, predecessor) pair, so any cell of the space runs on the same weights.

    model = build_supernet(cfg.model, vocab_size, n_nodes=12)
    set_cell(model, genotype)          # every layer runs this cell until the next call
    out = model(inputs, hidden, targets)

It is an ordinary RNNLanguageModel (embedding, locked/embedding dropout, DropConnect on the
recurrent matrices, AR/TAR, the configured head), so the search trains it with the same
StreamLoader and loss as a training run.
"""

from __future__ import annotations

import dataclasses

from ..models import build_model
from ..models.cell import Genotype, cell_layers


def build_supernet(model_cfg, vocab_size: int, n_nodes: int):
    # any valid genotype of the right size (a chain); the shared layers replace its layers
    placeholder = " ".join(f"tanh:{i}" for i in range(n_nodes))
    model = build_model(dataclasses.replace(model_cfg, arch="cell", cell=placeholder), vocab_size)
    sizes = [model_cfg.emb_size] + model.layer_sizes
    model.rnns = cell_layers(sizes, None, model_cfg.wdrop, n_nodes=n_nodes, shared=True)
    return model


def set_cell(model, genotype: Genotype) -> None:
    for layer in model.rnns:
        layer.set_genotype(genotype)
