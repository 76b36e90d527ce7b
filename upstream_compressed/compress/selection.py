"""Which heads / units to keep, given their scores: per layer or globally."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from ..model import SpeechTransformer
from .diagonality import DEFAULT_BAND, diagonality_scores
from .importance import data_driven_scores


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
    order = global_order(scores, normalize, layers)
    remove = math.floor(ratio * len(order) + 1e-9)
    removed = set(order[:remove])
    return [[j for j in range(len(s)) if (i, j) not in removed] for i, s in enumerate(scores)]


def global_order(scores: list[Tensor], normalize: bool, layers: list[int] | None = None) -> list[tuple[int, int]]:
    """Every (layer, index) of the chosen layers in the order global selection removes them (lowest first)."""
    chosen = [i for i in range(len(scores)) if layers is None or i in layers]
    candidates = []
    for i in chosen:
        layer_scores = scores[i].double()
        if normalize and layer_scores.numel():
            layer_scores = layer_scores / layer_scores.norm().clamp_min(1e-30)
        candidates += [(float(s), i, j) for j, s in enumerate(layer_scores)]
    return [(i, j) for _, i, j in sorted(candidates)]


def random_scores(sizes: list[int], seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=generator) for n in sizes]


def score(model: SpeechTransformer, step: dict[str, Any], kind: str, l1: Callable[[SpeechTransformer], list[Tensor]],
          sizes: list[int]) -> list[Tensor]:
    """Per layer, one importance per head or unit (``kind``), by the step's criterion."""
    criterion = step.get("criterion", "l1")
    if criterion == "l1":
        return l1(model)
    if criterion == "random":
        return random_scores(sizes, step.get("seed", 0))
    if criterion in ("diagonal_first", "diagonal_last"):  # heads only; the lowest score goes first
        diagonality = diagonality_scores(
            model, step["audio"], step.get("diagonal_band", DEFAULT_BAND), step.get("max_utterances", 32),
            step.get("max_seconds", 8.0), step.get("batch_size", 4), step.get("seed", 0),
        )
        return [-d if criterion == "diagonal_first" else d for d in diagonality]
    return data_driven_scores(
        model, kind, step["audio"], step.get("max_utterances", 32), step.get("max_seconds", 8.0),
        step.get("batch_size", 4), step.get("projections", 4), step.get("seed", 0),
    )


def choose(scores: list[Tensor], step: dict[str, Any], num_layers: int) -> list[list[int]]:
    """The indices each layer keeps, by the step's ratio, selection and layers."""
    layers = step.get("layers")
    if layers is not None and max(layers, default=-1) >= num_layers:
        raise ValueError(f"{step['method']}.layers {layers} names a layer beyond the model's {num_layers}")
    if step.get("selection", "per_layer") == "global":
        # L1 magnitudes are comparable across layers; data-driven scores are not (Michel et al. normalise).
        return keep_global(scores, step["ratio"], normalize=step.get("criterion", "l1") == "data_driven", layers=layers)
    return keep_per_layer(scores, step["ratio"], layers)
