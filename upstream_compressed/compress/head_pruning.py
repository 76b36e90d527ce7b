"""Attention-head pruning: heads are removed physically (q/k/v rows, out_proj columns).

Options: ``ratio`` (fraction of heads removed, in [0, 1)), ``criterion`` (``l1``: magnitude of the
head's q/k/v weights; ``data_driven``: Michel et al. on ``audio``; ``random``: the control;
``diagonal_first`` / ``diagonal_last``: the heads whose attention on ``audio`` is most / least
diagonal go first, within ±``diagonal_band`` frames, default 2), ``selection`` (``per_layer`` or
``global``), optional ``layers`` (restrict to these), ``seed``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..delta import Structure
from ..model import SpeechTransformer
from ..model.layers import effective_weight
from ..recipe import STEP_VALIDATORS, RecipeError
from . import STEPS, StepContext
from .diagonality import DEFAULT_BAND
from .options import DIAGONAL_CRITERIA, PRUNING_CRITERIA, check_pruning
from .selection import choose, score


def validate(step: dict[str, Any], where: str) -> None:
    check_pruning(step, where, "heads", (*PRUNING_CRITERIA, *DIAGONAL_CRITERIA), extra_options=("diagonal_band",))
    band = step.get("diagonal_band", DEFAULT_BAND)
    if isinstance(band, bool) or not isinstance(band, int) or band < 0:
        raise RecipeError(f"{where}.diagonal_band: expected a number of frames >= 0, got {band!r}")
    if "diagonal_band" in step and step.get("criterion") not in DIAGONAL_CRITERIA:
        raise RecipeError(f"{where}.diagonal_band: only the criteria {list(DIAGONAL_CRITERIA)} use it")


def l1_head_scores(model: SpeechTransformer) -> list[Tensor]:
    scores = []
    for layer in model.layers:
        attention = layer.attention
        if attention is None:  # the attention sublayer was removed: nothing to score
            scores.append(torch.zeros(0))
            continue
        weight = sum(effective_weight(getattr(attention, n)).detach().abs() for n in ("q_proj", "k_proj", "v_proj"))
        scores.append(weight.view(attention.num_heads, -1).sum(1) if attention.num_heads else torch.zeros(0))
    return scores


def prune_heads(
    model: SpeechTransformer, structure: Structure, step: dict[str, Any], context: StepContext
) -> tuple[SpeechTransformer, Structure]:
    sizes = [layer.num_heads for layer in model.config.layers]
    kept = choose(score(model, step, "heads", l1_head_scores, sizes), step, model.config.num_layers)
    for i, heads in enumerate(kept):
        if len(heads) != sizes[i]:
            model.keep_heads(i, heads)
            structure.keep_heads(i, heads, context.base.config.layers[structure.layers[i].source_layer].num_heads)
    return model, structure


STEP_VALIDATORS["head_pruning"] = validate
STEPS["head_pruning"] = prune_heads
