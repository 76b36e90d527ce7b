"""Attention-head pruning: heads are removed physically (q/k/v rows, out_proj columns).

Options: ``ratio`` (fraction of heads removed, in [0, 1)), ``criterion`` (``l1``: magnitude of the
head's q/k/v weights; ``data_driven``: Michel et al. on ``audio``; ``random``: the control),
``selection`` (``per_layer`` or ``global``), optional ``layers`` (restrict to these), ``seed``.
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
    check_pruning(step, where, "heads")


def l1_head_scores(model: SpeechTransformer) -> list[Tensor]:
    scores = []
    for layer in model.layers:
        attention = layer.attention
        weight = sum(effective_weight(getattr(attention, n)).detach().abs() for n in ("q_proj", "k_proj", "v_proj"))
        scores.append(weight.view(attention.num_heads, -1).sum(1) if attention.num_heads else torch.zeros(0))
    return scores


def prune_heads(
    model: SpeechTransformer, structure: Structure, step: dict[str, Any], context: StepContext
) -> tuple[SpeechTransformer, Structure]:
    sizes = [layer.attention.num_heads for layer in model.layers]
    kept = choose(score(model, step, "heads", l1_head_scores, sizes), step, model.config.num_layers)
    for i, heads in enumerate(kept):
        if len(heads) != sizes[i]:
            model.keep_heads(i, heads)
            structure.keep_heads(i, heads, context.base.config.layers[structure.layers[i].source_layer].num_heads)
    return model, structure


STEP_VALIDATORS["head_pruning"] = validate
STEPS["head_pruning"] = prune_heads
