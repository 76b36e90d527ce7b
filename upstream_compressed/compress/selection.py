"""Which heads / units to keep, given their scores: per layer or globally."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def keep_per_layer(scores: list[Tensor], ratio: float, layers: list[int] | None = None) -> list[list[int]]:
    """Remove floor(ratio * n) of the lowest-scoring items in each chosen layer; keep the order of the rest."""
    kept = []
    for i, layer_scores in enumerate(scores):
        n = len(layer_scores)
        if layers is not None and i not in layers:
            kept.append(list(range(n)))
            continue
        remove = math.floor(ratio * n + 1e-9)
        order = sorted(range(n), key=lambda j: (-float(layer_scores[j]), j))
        kept.append(sorted(order[: n - remove]))
    return kept


def keep_global(scores: list[Tensor], ratio: float, normalize: bool, layers: list[int] | None = None) -> list[list[int]]:
    """Remove floor(ratio * total) of the lowest-scoring items across the chosen layers.

    With ``normalize``, each layer's scores are divided by their L2 norm first (Michel et al.), so
    layers whose raw scores live on different scales compete fairly.
    """
    chosen = [i for i in range(len(scores)) if layers is None or i in layers]
    candidates = []
    for i in chosen:
        layer_scores = scores[i].double()
        if normalize and layer_scores.numel():
            layer_scores = layer_scores / layer_scores.norm().clamp_min(1e-30)
        candidates += [(float(s), i, j) for j, s in enumerate(layer_scores)]
    remove = math.floor(ratio * len(candidates) + 1e-9)
    removed = {(i, j) for _, i, j in sorted(candidates)[:remove]}
    return [[j for j in range(len(s)) if (i, j) not in removed] for i, s in enumerate(scores)]


def random_scores(sizes: list[int], seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=generator) for n in sizes]
