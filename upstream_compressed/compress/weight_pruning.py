"""Weight pruning: individual weights of the encoder's Linears zeroed by magnitude, kept as masks.

Options: ``sparsity`` (fraction of the targeted weights that are zero after the step, in (0, 1));
``selection``: ``global`` (default; one magnitude threshold over all targeted weights, as in
MelHuBERT's and Han et al.'s pruning) or ``per_layer`` (uniform: every targeted Linear gets
``sparsity``); ``pattern``: ``unstructured`` (default) or ``2:4`` (in every group of 4 consecutive
inputs of a row the 2 largest weights stay: NVIDIA's semi-structured pattern, 50% sparse, per Linear);
``targets``: ``attention`` (q/k/v/out_proj), ``ffn`` (fc1/fc2) or Linear names, default both groups;
optional ``layers``. Only weights are pruned: biases, the conv front end, the positional conv, the
feature projection and prediction heads stay dense, and low-rank Linears are left alone.

Masks only grow: a later step never revives a weight an earlier one pruned, so an iterative schedule
is a list of steps with rising ``sparsity`` and a ``recovery:`` each. Masked Linears multiply by their
mask in every differentiable forward, so recovery training leaves pruned weights exactly zero.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..delta import Structure
from ..model import SpeechTransformer
from ..model.sparse import MaskedLinear
from ..recipe import STEP_VALIDATORS, RecipeError
from . import STEPS, StepContext
from .options import check_choice, check_fraction, check_keys, check_layers, check_recovery, check_targets, target_names

SELECTIONS = ("global", "per_layer")
UNSTRUCTURED, TWO_FOUR = "unstructured", "2:4"
# YAML 1.1 reads an unquoted `2:4` as the base-60 integer 2*60 + 4; accept it as the pattern it spells.
YAML_TWO_FOUR = 124


def _pattern(step: dict[str, Any]) -> str:
    pattern = step.get("pattern", UNSTRUCTURED)
    return TWO_FOUR if pattern == YAML_TWO_FOUR else pattern


def validate(step: dict[str, Any], where: str) -> None:
    check_recovery(step, where)
    check_keys(step, where, ("sparsity", "selection", "pattern", "targets", "layers"))
    pattern = _pattern(step)
    if pattern not in (UNSTRUCTURED, TWO_FOUR):
        raise RecipeError(f"{where}.pattern: {step['pattern']!r} is not one of ['{UNSTRUCTURED}', '{TWO_FOUR}']")
    if pattern == TWO_FOUR:
        if step.get("sparsity", 0.5) != 0.5:
            raise RecipeError(f"{where}.sparsity: pattern 2:4 prunes exactly 0.5 (2 of every 4 weights), not {step['sparsity']}")
        if "selection" in step:
            raise RecipeError(f"{where}.selection: does not apply to pattern 2:4 (every group of 4 keeps its 2 largest)")
    else:
        check_fraction(step, where, "sparsity", 0.0, 1.0, include_high=False,
                       meaning="the fraction of the targeted weights that are zero after this step")
        if step["sparsity"] == 0:
            raise RecipeError(f"{where}.sparsity: 0 prunes nothing; use a value in (0, 1)")
    check_choice(step, where, "selection", SELECTIONS, "global")
    check_targets(step, where)
    check_layers(step, where)


# ------------------------------------------------------------------------------------ masks
def keep_largest(scores: Tensor, prune: int) -> Tensor:
    """A keep-mask over flat ``scores`` that prunes exactly ``prune`` of the lowest (ties: first ones)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if prune <= 0:
        return keep
    threshold = scores.kthvalue(prune).values
    below = scores < threshold
    keep &= ~below
    ties = (scores == threshold).nonzero().flatten()[: prune - int(below.count_nonzero())]
    keep[ties] = False
    return keep


def _scores(linear: torch.nn.Module) -> Tensor:
    """|w|, with weights that are already pruned ranked below every live one."""
    scores = linear.weight.detach().abs().float()
    if isinstance(linear, MaskedLinear):
        scores = scores.masked_fill(~linear.mask, -1.0)
    return scores


def unstructured_masks(linears: list[torch.nn.Module], sparsity: float, selection: str) -> list[Tensor]:
    scores = [_scores(linear) for linear in linears]
    if selection == "per_layer":
        return [keep_largest(s.flatten(), round(sparsity * s.numel())).view_as(s) for s in scores]
    flat = torch.cat([s.flatten() for s in scores])
    keep = keep_largest(flat, round(sparsity * flat.numel()))
    return [k.view_as(s) for k, s in zip(keep.split([s.numel() for s in scores]), scores)]


def two_four_mask(linear: torch.nn.Module, where: str) -> Tensor:
    scores = _scores(linear)
    out_features, in_features = scores.shape
    if in_features % 4:
        raise ValueError(f"{where}: 2:4 pruning needs the input size to be a multiple of 4, not {in_features}")
    groups = scores.view(out_features, in_features // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.view(out_features, in_features)


def prune_weights(
    model: SpeechTransformer, structure: Structure, step: dict[str, Any], context: StepContext
) -> tuple[SpeechTransformer, Structure]:
    layers = step.get("layers")
    if layers is not None and max(layers, default=-1) >= model.config.num_layers:
        raise ValueError(f"weight_pruning.layers {layers} names a layer beyond the model's {model.config.num_layers}")
    targets = []
    for i in layers if layers is not None else range(model.config.num_layers):
        for name in target_names(step):
            if name not in model.config.layers[i].linear_names:
                continue  # its sublayer was removed
            linear = model.linear(i, name)
            if isinstance(linear, torch.nn.Linear) and linear.weight.numel():  # not low-rank, not pruned away
                targets.append((i, name, linear))
    if not targets:
        raise ValueError(f"{context.label}: weight_pruning found no dense Linear among its targets to prune")
    if _pattern(step) == TWO_FOUR:
        masks = [two_four_mask(linear, f"layer {i} {name}") for i, name, linear in targets]
    else:
        masks = unstructured_masks([t[2] for t in targets], step["sparsity"], step.get("selection", "global"))
    for (i, name, _), keep in zip(targets, masks):
        model.prune_weights(i, name, keep)
    return model, structure


STEP_VALIDATORS["weight_pruning"] = validate
STEPS["weight_pruning"] = prune_weights
