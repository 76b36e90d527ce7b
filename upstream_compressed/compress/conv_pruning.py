"""CNN channel pruning: output channels of the convolutional front end are removed physically.

A conv layer's channel is its filter (a row of the conv weight, its norm's entry) and the next
layer's input channel; on the last conv layer also the feature LayerNorm's entry and the feature
projection's input column. The front end is about a third of HuBERT Base's MACs and few of its
parameters, so this trades little size for much compute.

Options: ``ratio`` (fraction of each chosen layer's channels removed, in [0, 1): a layer of C keeps
round(C * (1 - ratio)), at least 1), ``criterion`` (``l1``: L1 norm of the channel's filter;
``data_driven``: the channel's gradient importance on ``audio``, as head/row pruning's; ``random``:
the control), optional ``conv_layers`` (conv layer indices, 0-based; default every prunable one:
all, the last only when a feature projection follows it), ``seed``, the data options of
``data_driven`` (``audio``, ``max_utterances``, ``max_seconds``, ``batch_size``, ``projections``),
and ``recovery`` like every step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..delta import Structure
from ..model import SpeechTransformer
from ..model.config import FBANK
from ..recipe import STEP_VALIDATORS, RecipeError
from . import STEPS, StepContext
from .importance import gate_importance
from .options import (
    DATA_OPTIONS,
    PRUNING_CRITERIA,
    check_audio,
    check_choice,
    check_fraction,
    check_keys,
    check_number,
    check_positive_int,
    check_recovery,
    check_seed,
)
from .selection import random_scores


def validate(step: dict[str, Any], where: str) -> None:
    check_recovery(step, where)
    if "layers" in step:  # other steps' `layers` are encoder layers; say which indices this one takes
        raise RecipeError(f"{where}.layers: conv_pruning prunes front-end conv layers: name them with "
                          "`conv_layers: [0, 1, ...]` (0-based conv layer indices)")
    check_keys(step, where, ("ratio", "criterion", "conv_layers", "seed", *DATA_OPTIONS))
    check_fraction(step, where, "ratio", 0.0, 1.0, include_high=False,
                   meaning="the fraction of each conv layer's channels removed; at least one channel always stays")
    criterion = check_choice(step, where, "criterion", PRUNING_CRITERIA, "l1")
    layers = step.get("conv_layers")
    if layers is not None and (not isinstance(layers, list) or not layers or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers) or len(set(layers)) != len(layers)):
        raise RecipeError(f"{where}.conv_layers: expected a non-empty list of distinct conv layer indices "
                          f"(0-based), got {layers!r}")
    check_audio(step, where, criterion == "data_driven")
    for name, default in (("max_utterances", 32), ("batch_size", 4), ("projections", 4)):
        check_positive_int(step, where, name, default)
    check_number(step, where, "max_seconds")
    check_seed(step, where)


def prunable_layers(model: SpeechTransformer) -> list[int]:
    """Conv layers whose channels can go: all, the last only when a feature projection consumes it."""
    count = len(model.config.conv_layers)
    return list(range(count if model.feature_projection is not None else count - 1))


def chosen_layers(model: SpeechTransformer, step: dict[str, Any], where: str) -> list[int]:
    """The step's ``conv_layers`` checked against the model (or every prunable layer)."""
    if model.config.frontend == FBANK:
        raise RecipeError(f"{where}.method: conv_pruning needs a convolutional front end; this base has an fbank "
                          "front end (MelHuBERT) with no conv channels")
    layers = step.get("conv_layers")
    if layers is None:
        return prunable_layers(model)
    count = len(model.config.conv_layers)
    beyond = [i for i in layers if i >= count]
    if beyond:
        raise RecipeError(f"{where}.conv_layers: {beyond} name conv layers beyond the front end's {count} (0-based)")
    if count - 1 in layers and model.feature_projection is None:
        raise RecipeError(f"{where}.conv_layers: the last conv layer ({count - 1}) feeds the encoder directly (its "
                          "channels equal embed_dim, no feature projection), so it cannot be pruned; leave it out")
    return sorted(layers)


def l1_channel_scores(model: SpeechTransformer, layers: list[int]) -> list[Tensor]:
    """Per chosen layer, each output channel's filter L1 norm."""
    convs = model.feature_extractor.convs
    return [convs[i].weight.detach().abs().sum(dim=(1, 2)).cpu() for i in layers]


def _consumer(model: SpeechTransformer, layer: int) -> torch.nn.Module:
    """The module whose input is conv ``layer``'s output after its norm and GELU."""
    if layer + 1 < len(model.config.conv_layers):
        return model.feature_extractor.convs[layer + 1]
    return model.feature_norm if model.feature_norm is not None else model.feature_projection


def data_driven_channel_scores(model: SpeechTransformer, layers: list[int], audio_dir: str, max_utterances: int = 32,
                               max_seconds: float = 8.0, batch_size: int = 4, projections: int = 4,
                               seed: int = 0) -> list[Tensor]:
    """Per chosen layer, each channel's importance: sqrt E[(dL/dxi)^2] for a gate xi = 1 on the channel.

    The gate multiplies the channel where removing it takes effect (after its norm and GELU), and L
    is a random projection of all hidden states, as for heads and units (:mod:`.importance`).
    """
    device = next(model.parameters()).device

    def attach_gates(model: SpeechTransformer) -> tuple[list[Tensor], list[Any]]:
        gates = [torch.ones(model.config.conv_layers[i][0], device=device, requires_grad=True) for i in layers]
        handles = []
        for i, gate in zip(layers, gates):
            channel_axis = 1 if i + 1 < len(model.config.conv_layers) else -1  # (B, C, T) inside, (B, T, C) after

            def hook(_module, inputs, gate=gate, axis=channel_axis):
                (x,) = inputs
                return (x * (gate[:, None] if axis == 1 else gate),)

            handles.append(_consumer(model, i).register_forward_pre_hook(hook))
        return gates, handles

    return gate_importance(model, attach_gates, "channels", audio_dir, max_utterances, max_seconds, batch_size,
                           projections, seed)


def keep_count(channels: int, ratio: float) -> int:
    """Channels a layer of ``channels`` keeps: round(C * (1 - ratio)), halves up, at least one."""
    return max(1, math.floor(channels * (1 - ratio) + 0.5 + 1e-9))


def keep_best(scores: Tensor, keep: int) -> list[int]:
    """The ``keep`` highest-scoring indices (ties: the lower index), in their original order."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:keep])


def prune_channels(
    model: SpeechTransformer, structure: Structure, step: dict[str, Any], context: StepContext
) -> tuple[SpeechTransformer, Structure]:
    layers = chosen_layers(model, step, f"steps[{context.index}]")
    criterion = step.get("criterion", "l1")
    sizes = [model.config.conv_layers[i][0] for i in layers]
    if criterion == "l1":
        scores = l1_channel_scores(model, layers)
    elif criterion == "random":
        scores = random_scores(sizes, step.get("seed", 0))
    else:
        scores = data_driven_channel_scores(
            model, layers, step["audio"], step.get("max_utterances", 32), step.get("max_seconds", 8.0),
            step.get("batch_size", 4), step.get("projections", 4), step.get("seed", 0),
        )
    for i, size, layer_scores in zip(layers, sizes, scores):
        kept = keep_best(layer_scores, keep_count(size, step["ratio"]))
        if len(kept) != size:
            model.keep_channels(i, kept)
            structure.keep_channels(i, kept, base_channels=context.base.config.conv_layers[i][0])
    return model, structure


STEP_VALIDATORS["conv_pruning"] = validate
STEPS["conv_pruning"] = prune_channels
