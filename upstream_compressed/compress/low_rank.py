"""Low-rank approximation: a Linear W (out x in) becomes B·A of rank r by truncated SVD.

Options: ``targets`` (``attention``, ``ffn`` or Linear names q_proj/k_proj/v_proj/out_proj/fc1/fc2;
default both groups), optional ``layers``, and exactly one of ``ratio`` (fraction of each targeted
Linear's weight parameters removed, in (0, 1)) or ``energy`` (keep the smallest rank whose singular
values hold this fraction of the squared Frobenius norm, in (0, 1]). A Linear is never factorised
where the rank would not save parameters: r (in + out) must be below in x out.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..delta import Structure
from ..model import SpeechTransformer
from ..model.layers import effective_weight, factorize
from ..recipe import STEP_VALIDATORS, RecipeError
from . import STEPS, StepContext
from .options import check_fraction, check_keys, check_layers, check_recovery, check_targets, target_names

def validate(step: dict[str, Any], where: str) -> None:
    check_recovery(step, where)
    check_keys(step, where, ("ratio", "energy", "targets", "layers"))
    if ("ratio" in step) == ("energy" in step):
        raise RecipeError(f"{where}: give exactly one of `ratio` (parameters removed) or `energy` (kept)")
    check_fraction(step, where, "ratio", 0.0, 1.0, include_high=False, required=False,
                   meaning="the fraction of each targeted Linear's weights removed")
    if step.get("ratio") == 0:
        raise RecipeError(f"{where}.ratio: 0 removes nothing; use a value in (0, 1)")
    check_fraction(step, where, "energy", 0.0, 1.0, include_high=True, required=False,
                   meaning="the fraction of spectral energy kept")
    check_targets(step, where)
    check_layers(step, where)


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """The largest rank whose factors hold at most (1 - ratio) of the dense weight's parameters."""
    return max(1, math.floor((1 - ratio) * out_features * in_features / (out_features + in_features)))


def rank_for_energy(weight: torch.Tensor, energy: float) -> int:
    w = weight.detach().double()
    squares = torch.linalg.eigvalsh(w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T).clamp_min(0).flip(0)
    cumulative = torch.cumsum(squares, 0) / squares.sum().clamp_min(1e-30)
    return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12)).item()) + 1


def saves_parameters(out_features: int, in_features: int, rank: int) -> bool:
    return rank * (out_features + in_features) < out_features * in_features


def factorize_linears(
    model: SpeechTransformer, structure: Structure, step: dict[str, Any], context: StepContext
) -> tuple[SpeechTransformer, Structure]:
    layers = step.get("layers") or range(model.config.num_layers)
    for i in layers:
        for name in target_names(step):
            if name not in model.config.layers[i].linear_names:
                continue  # its sublayer was removed
            linear = model.linear(i, name)
            out_features, in_features = linear.out_features, linear.in_features
            if out_features == 0 or in_features == 0:
                continue  # pruned away entirely
            if "ratio" in step:
                rank = rank_for_ratio(out_features, in_features, step["ratio"])
            else:
                rank = rank_for_energy(effective_weight(linear), step["energy"])
            current = getattr(linear, "rank", None)
            if saves_parameters(out_features, in_features, rank) and (current is None or rank < current):
                model.replace_linear(i, name, factorize(linear, rank))
    return model, structure


STEP_VALIDATORS["low_rank"] = validate
STEPS["low_rank"] = factorize_linears
