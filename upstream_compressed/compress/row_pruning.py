"""FFN row pruning: hidden units are removed physically (fc1 rows, fc2 columns).

Options: ``ratio`` (fraction of units removed, in [0, 1)), ``criterion`` (``l1``: |fc1 row|_1 +
|fc2 column|_1; ``data_driven`` on ``audio``; ``random``), ``selection`` (``per_layer`` or ``global``),
optional ``layers``, ``seed``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..delta import Structure
from ..model import SpeechTransformer
from ..model.layers import effective_weight
from ..recipe import STEP_VALIDATORS
from . import STEPS, StepContext
from .options import check_pruning
from .selection import choose, score


def validate(step: dict[str, Any], where: str) -> None:
    check_pruning(step, where, "units")


def l1_unit_scores(model: SpeechTransformer) -> list[Tensor]:
    scores = []
    for layer in model.layers:
        ffn = layer.feed_forward
        if ffn is None:  # the FFN sublayer was removed: nothing to score
            scores.append(torch.zeros(0))
            continue
        scores.append(effective_weight(ffn.fc1).detach().abs().sum(1) + effective_weight(ffn.fc2).detach().abs().sum(0))
    return scores


def prune_rows(
    model: SpeechTransformer, structure: Structure, step: dict[str, Any], context: StepContext
) -> tuple[SpeechTransformer, Structure]:
    sizes = [layer.ffn_dim for layer in model.config.layers]
    kept = choose(score(model, step, "units", l1_unit_scores, sizes), step, model.config.num_layers)
    for i, units in enumerate(kept):
        if len(units) != sizes[i]:
            model.keep_units(i, units)
            structure.keep_units(i, units, context.base.config.layers[structure.layers[i].source_layer].ffn_dim)
    return model, structure


STEP_VALIDATORS["row_pruning"] = validate
STEPS["row_pruning"] = prune_rows
