"""Shared by the cell-layer and the cell-search tests."""

from __future__ import annotations

import itertools

from dist_lm.models.cell import ACTIVATIONS, Genotype


def all_genotypes(n: int):
    """Every cell of n nodes (node 1 reads the input, node i >= 2 one earlier node), by brute
    force: the space the controller samples from and the cell layer must build."""
    pred_choices = [[0]] + [list(range(1, i)) for i in range(2, n + 1)]
    for preds in itertools.product(*pred_choices):
        for acts in itertools.product(ACTIVATIONS, repeat=n):
            yield Genotype(acts, preds)
