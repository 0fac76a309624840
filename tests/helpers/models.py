"""Shared by the model and kernel tests: the cell search space, a binomial bound."""

from __future__ import annotations

import itertools
import math

from dist_lm.models.cell import ACTIVATIONS, Genotype


def all_genotypes(n: int):
    """Every cell of n nodes (node 1 reads the input, node i >= 2 one earlier node), by brute
    force: the space the controller samples from and the cell layer must build."""
    pred_choices = [[0]] + [list(range(1, i)) for i in range(2, n + 1)]
    for preds in itertools.product(*pred_choices):
        for acts in itertools.product(ACTIVATIONS, repeat=n):
            yield Genotype(acts, preds)


def within_binomial(k: int, n: int, p: float, sigmas: float = 6.0) -> bool:
    """k successes of n draws of probability p lie within `sigmas` standard deviations."""
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p))
