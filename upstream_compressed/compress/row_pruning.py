"""FFN row pruning: hidden units are removed physically (fc1 rows, fc2 columns).

Options: ``ratio`` (fraction of units removed, in [0, 1)), ``criterion`` (``l1``: |fc1 row|_1 +
|fc2 column|_1; ``data_driven`` on ``audio``; ``random``), ``selection`` (``per_layer`` or ``global``),
optional ``layers``, ``seed``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..delta import Structure
from ..model import SpeechTransformer
from ..model.layers import effective_weight
from ..recipe import STEP_VALIDATORS
from . import STEPS, StepContext
from .head_pruning import CRITERIA, DATA_OPTIONS, SELECTIONS
from .importance import data_driven_scores
from .options import check_recovery, check_audio, check_choice, check_fraction, check_keys, check_layers, check_positive_int
from .selection import keep_global, keep_per_layer, random_scores


def validate(step: dict[str, Any], where: str) -> None:
    check_recovery(step, where)
    check_keys(step, where, ("ratio", "criterion", "selection", "layers", "seed", *DATA_OPTIONS))
    check_fraction(step, where, "ratio", 0.0, 1.0, include_high=False,
                   meaning="the fraction of FFN units removed; 1.0 would remove every unit")
    criterion = check_choice(step, where, "criterion", CRITERIA, "l1")
    check_choice(step, where, "selection", SELECTIONS, "per_layer")
    check_layers(step, where)
    check_audio(step, where, criterion == "data_driven")
    for name, default in (("max_utterances", 32), ("batch_size", 4), ("projections", 4)):
        check_positive_int(step, where, name, default)


def l1_unit_scores(model: SpeechTransformer) -> list[Tensor]:
    scores = []
    for layer in model.layers:
        ffn = layer.feed_forward
        fc1 = effective_weight(ffn.fc1).detach().abs().sum(1)
        fc2 = effective_weight(ffn.fc2).detach().abs().sum(0)
        scores.append(fc1 + fc2)
    return scores


def unit_scores(model: SpeechTransformer, step: dict[str, Any]) -> list[Tensor]:
    criterion = step.get("criterion", "l1")
    if criterion == "l1":
        return l1_unit_scores(model)
    if criterion == "random":
        return random_scores([layer.feed_forward.ffn_dim for layer in model.layers], step.get("seed", 0))
    return data_driven_scores(
        model, "units", step["audio"], step.get("max_utterances", 32), step.get("max_seconds", 8.0),
        step.get("batch_size", 4), step.get("projections", 4), step.get("seed", 0),
    )


def prune_rows(
    model: SpeechTransformer, structure: Structure, step: dict[str, Any], context: StepContext
) -> tuple[SpeechTransformer, Structure]:
    scores = unit_scores(model, step)
    layers = step.get("layers")
    if step.get("selection", "per_layer") == "global":
        kept = keep_global(scores, step["ratio"], normalize=step.get("criterion", "l1") == "data_driven", layers=layers)
    else:
        kept = keep_per_layer(scores, step["ratio"], layers)
    for i, units in enumerate(kept):
        if len(units) != model.config.layers[i].ffn_dim:
            model.keep_units(i, units)
            structure.keep_units(i, units, context.base.config.layers[structure.layers[i].source_layer].ffn_dim)
    return model, structure


STEP_VALIDATORS["row_pruning"] = validate
STEPS["row_pruning"] = prune_rows
