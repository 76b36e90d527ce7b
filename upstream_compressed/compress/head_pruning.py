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
from .importance import data_driven_scores
from .options import check_recovery, check_audio, check_choice, check_fraction, check_keys, check_layers, check_positive_int
from .selection import keep_global, keep_per_layer, random_scores

CRITERIA = ("l1", "data_driven", "random")
SELECTIONS = ("per_layer", "global")
DATA_OPTIONS = ("audio", "max_utterances", "max_seconds", "batch_size", "projections")


def validate(step: dict[str, Any], where: str) -> None:
    check_recovery(step, where)
    check_keys(step, where, ("ratio", "criterion", "selection", "layers", "seed", *DATA_OPTIONS))
    check_fraction(step, where, "ratio", 0.0, 1.0, include_high=False,
                   meaning="the fraction of heads removed; 1.0 would remove every head of every layer")
    criterion = check_choice(step, where, "criterion", CRITERIA, "l1")
    check_choice(step, where, "selection", SELECTIONS, "per_layer")
    check_layers(step, where)
    check_audio(step, where, criterion == "data_driven")
    for name, default in (("max_utterances", 32), ("batch_size", 4), ("projections", 4)):
        check_positive_int(step, where, name, default)


def l1_head_scores(model: SpeechTransformer) -> list[Tensor]:
    scores = []
    for layer in model.layers:
        attention = layer.attention
        weight = sum(effective_weight(getattr(attention, n)).detach().abs() for n in ("q_proj", "k_proj", "v_proj"))
        scores.append(weight.view(attention.num_heads, -1).sum(1) if attention.num_heads else torch.zeros(0))
    return scores


def head_scores(model: SpeechTransformer, step: dict[str, Any]) -> list[Tensor]:
    criterion = step.get("criterion", "l1")
    if criterion == "l1":
        return l1_head_scores(model)
    if criterion == "random":
        return random_scores([layer.attention.num_heads for layer in model.layers], step.get("seed", 0))
    return data_driven_scores(
        model, "heads", step["audio"], step.get("max_utterances", 32), step.get("max_seconds", 8.0),
        step.get("batch_size", 4), step.get("projections", 4), step.get("seed", 0),
    )


def prune_heads(
    model: SpeechTransformer, structure: Structure, step: dict[str, Any], context: StepContext
) -> tuple[SpeechTransformer, Structure]:
    scores = head_scores(model, step)
    layers = step.get("layers")
    if layers is not None and max(layers, default=-1) >= model.config.num_layers:
        raise ValueError(f"head_pruning.layers {layers} names a layer beyond the model's {model.config.num_layers}")
    if step.get("selection", "per_layer") == "global":
        # L1 magnitudes are comparable across layers; data-driven scores are not (Michel et al. normalise).
        kept = keep_global(scores, step["ratio"], normalize=step.get("criterion", "l1") == "data_driven", layers=layers)
    else:
        kept = keep_per_layer(scores, step["ratio"], layers)
    for i, heads in enumerate(kept):
        if len(heads) != model.config.layers[i].num_heads:
            model.keep_heads(i, heads)
            structure.keep_heads(i, heads, context.base.config.layers[structure.layers[i].source_layer].num_heads)
    return model, structure


STEP_VALIDATORS["head_pruning"] = validate
STEPS["head_pruning"] = prune_heads
