"""Validation of a step's options: every error names the field, before any work starts."""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

from ..recipe import RecipeError


def names(keys: Iterable[Any]) -> list[str]:
    """Keys as sorted text: YAML keys may be numbers or null, which ``sorted`` cannot compare with strings."""
    return sorted(str(k) for k in keys)


def check_keys(step: dict[str, Any], where: str, allowed: Iterable[str]) -> None:
    unknown = set(step) - set(allowed) - {"method", "recovery"}
    if unknown:
        raise RecipeError(
            f"{where}: unknown option(s) {names(unknown)} for {step['method']}; allowed: {sorted(allowed)}")


def is_number(value: Any) -> bool:
    """An int or float that is finite (YAML's .nan / .inf are refused); bools are not numbers here."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_number(options: dict[str, Any], where: str, name: str, *, integer: bool = False, zero_ok: bool = False,
                 optional: bool = False) -> None:
    """``options[name]``, when present: a finite number (an integer if ``integer``) > 0 (>= 0 if ``zero_ok``);
    ``optional`` also allows null."""
    if name not in options or (optional and options[name] is None):
        return
    value = options[name]
    valid = (is_integer(value) if integer else is_number(value)) and (value >= 0 if zero_ok else value > 0)
    if not valid:
        sign = "non-negative" if zero_ok else "positive"
        raise RecipeError(f"{where}.{name}: expected a {sign} {'integer' if integer else 'number'}, got {value!r}")


def check_seed(options: dict[str, Any], where: str) -> None:
    if "seed" in options and not is_integer(options["seed"]):
        raise RecipeError(f"{where}.seed: expected an integer, got {options['seed']!r}")


def check_choice(step: dict[str, Any], where: str, name: str, choices: Iterable[str], default: str) -> str:
    value = step.get(name, default)
    if not isinstance(value, str) or value not in choices:
        raise RecipeError(f"{where}.{name}: {value!r} is not one of {sorted(choices)}")
    return value


def check_fraction(step: dict[str, Any], where: str, name: str, low: float, high: float, *,
                   include_high: bool, required: bool = True, meaning: str = "") -> float | None:
    if name not in step:
        if required:
            raise RecipeError(f"{where}.{name} is missing ({meaning})")
        return None
    value = step[name]
    if not is_number(value):
        raise RecipeError(f"{where}.{name}: expected a number, got {value!r}")
    inside = low <= value <= high if include_high else low <= value < high
    if not inside:
        bracket = "]" if include_high else ")"
        raise RecipeError(f"{where}.{name}: {value} is outside [{low}, {high}{bracket} ({meaning})")
    return float(value)


def check_positive_int(step: dict[str, Any], where: str, name: str, default: int) -> int:
    value = step.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RecipeError(f"{where}.{name}: expected a positive integer, got {value!r}")
    return value


def check_layers(step: dict[str, Any], where: str) -> list[int] | None:
    layers = step.get("layers")
    if layers is None:
        return None
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise RecipeError(f"{where}.layers: expected a list of layer indices (0-based), got {layers!r}")
    return layers


def check_audio(step: dict[str, Any], where: str, needed: bool) -> None:
    if not needed and "audio" in step and (not isinstance(step["audio"], str) or not step["audio"].strip()):
        raise RecipeError(f"{where}.audio: expected a directory of .wav/.flac, got {step['audio']!r}")
    if needed and (not isinstance(step.get("audio"), str) or not step["audio"].strip()):
        criterion = step.get("criterion", "data_driven")
        raise RecipeError(f"{where}.audio: the {criterion} criterion needs `audio: DIR` (a directory of .wav/.flac)")


def check_recovery(step: dict[str, Any], where: str) -> None:
    """``recovery:`` (optional on any step): distillation from the uncompressed base after the step."""
    if "recovery" in step:
        check_training_options(step["recovery"], f"{where}.recovery")


def check_training_options(options: Any, where: str) -> None:
    """Options of a training run (recovery, or a distillation step): `audio` and TrainOptions fields."""
    from ..train.distill import TrainOptions

    if not isinstance(options, dict) or not isinstance(options.get("audio"), str) or not options["audio"].strip():
        got = f", got audio: {options.get('audio')!r}" if isinstance(options, dict) else f", got {options!r}"
        raise RecipeError(f"{where}: expected a mapping with at least `audio: DIR` (and e.g. `steps: 200`){got}")
    known = set(TrainOptions.__dataclass_fields__)
    if set(options) - known:
        raise RecipeError(f"{where}: unknown training option(s) {names(set(options) - known)}; known: {sorted(known)}")
    for name in ("steps", "batch_size", "grad_accumulation", "checkpoint_every"):
        check_number(options, where, name, integer=True)
    check_number(options, where, "warmup_steps", integer=True, zero_ok=True, optional=True)
    for name in ("lr", "max_seconds", "clip_norm"):
        check_number(options, where, name)
    for name in ("weight_decay", "cosine_weight"):
        check_number(options, where, name, zero_ok=True)
    check_number(options, where, "num_workers", integer=True, zero_ok=True, optional=True)
    check_number(options, where, "seconds_per_batch", optional=True)
    per_batch, longest = options.get("seconds_per_batch"), options.get("max_seconds", 4.0)
    if per_batch is not None and "batch_size" in options:
        raise RecipeError(f"{where}: give batch_size (files per batch) or seconds_per_batch (audio per batch), not both")
    if per_batch is not None and per_batch < longest:
        raise RecipeError(f"{where}.seconds_per_batch: {per_batch} is less than max_seconds {longest}, so the "
                          "longest files would fit no batch")
    check_seed(options, where)
    for name in ("freeze_front_end", "amp"):
        if name in options and not isinstance(options[name], bool):
            raise RecipeError(f"{where}.{name}: expected true or false, got {options[name]!r}")
    device = options.get("device", "auto")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise RecipeError(f"{where}.device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    pairs = options.get("pairs")
    if pairs is not None and (not isinstance(pairs, list) or not pairs or not all(
            isinstance(p, list) and len(p) == 2 and all(is_integer(i) and i >= 0 for i in p) for p in pairs)):
        raise RecipeError(f"{where}.pairs: expected a non-empty list of [student_state, teacher_state] "
                          f"index pairs (0-based), got {pairs!r}")
    check_objective(options, where)


def check_objective(options: dict[str, Any], where: str) -> str:
    """``objective``: hidden_states (L1 + cosine on state pairs), temporal_relation (temporal Gram
    matrices of the same pairs) or cluster_kl (KL on cluster posteriors)."""
    from ..train.distill import CLUSTER_KL, HIDDEN_STATES, OBJECTIVES, TEMPORAL_RELATION

    objective = check_choice(options, where, "objective", OBJECTIVES, HIDDEN_STATES)
    if objective == TEMPORAL_RELATION:
        if "cosine_weight" in options:
            raise RecipeError(f"{where}.cosine_weight: applies to objective hidden_states only; temporal_relation "
                              "compares frame-by-frame Gram matrices (weigh its intra-layer term with "
                              "intra_layer_weight)")
        check_number(options, where, "intra_layer_weight", zero_ok=True)
    elif "intra_layer_weight" in options:
        raise RecipeError(f"{where}.intra_layer_weight: applies to objective temporal_relation only")
    if objective == CLUSTER_KL:
        for name in ("pairs", "cosine_weight"):
            if name in options:
                users = "hidden_states and temporal_relation" if name == "pairs" else "hidden_states"
                raise RecipeError(f"{where}.{name}: applies to objective {users} only; cluster_kl compares "
                                  "the cluster posteriors of the encoder outputs")
        temperature = options.get("logit_temperature")
        if temperature is not None and (not is_number(temperature) or temperature <= 0):
            raise RecipeError(f"{where}.logit_temperature: expected a positive number (HuBERT uses 0.1), "
                              f"got {temperature!r}")
    elif "logit_temperature" in options:
        raise RecipeError(f"{where}.logit_temperature: applies to objective cluster_kl only")
    return objective


PRUNING_CRITERIA = ("l1", "data_driven", "random")
# Head pruning only: remove the heads whose attention is most (or least) diagonal first.
DIAGONAL_CRITERIA = ("diagonal_first", "diagonal_last")
DATA_CRITERIA = ("data_driven", *DIAGONAL_CRITERIA)  # criteria that run the model on `audio`
PRUNING_SELECTIONS = ("per_layer", "global")
DATA_OPTIONS = ("audio", "max_utterances", "max_seconds", "batch_size", "projections")


def check_pruning(step: dict[str, Any], where: str, what: str, criteria: tuple[str, ...] = PRUNING_CRITERIA,
                  extra_options: tuple[str, ...] = ()) -> None:
    """The options head and row pruning share; ``what`` names what ``ratio`` removes."""
    check_recovery(step, where)
    check_keys(step, where, ("ratio", "criterion", "selection", "layers", "seed", *DATA_OPTIONS, *extra_options))
    check_fraction(step, where, "ratio", 0.0, 1.0, include_high=False,
                   meaning=f"the fraction of {what} removed; 1.0 would remove every {what[:-1]} of every layer")
    criterion = check_choice(step, where, "criterion", criteria, "l1")
    check_choice(step, where, "selection", PRUNING_SELECTIONS, "per_layer")
    check_layers(step, where)
    check_audio(step, where, criterion in DATA_CRITERIA)
    for name, default in (("max_utterances", 32), ("batch_size", 4), ("projections", 4)):
        check_positive_int(step, where, name, default)
    check_number(step, where, "max_seconds")
    check_seed(step, where)


LINEAR_GROUPS = {"attention": ("q_proj", "k_proj", "v_proj", "out_proj"), "ffn": ("fc1", "fc2")}


def target_names(step: dict[str, Any]) -> list[str]:
    """The Linear names a step's ``targets`` (groups or names; default all) stand for, in order."""
    names: list[str] = []
    for target in step.get("targets", ["attention", "ffn"]):
        for name in LINEAR_GROUPS.get(target, (target,)):
            if name not in names:
                names.append(name)
    return names


def check_targets(step: dict[str, Any], where: str) -> None:
    from ..model import LINEAR_NAMES

    targets = step.get("targets", ["attention", "ffn"])
    if not isinstance(targets, list) or not targets:
        raise RecipeError(f"{where}.targets: expected a non-empty list such as [attention, ffn]")
    for target in targets:
        if not isinstance(target, str) or (target not in LINEAR_GROUPS and target not in LINEAR_NAMES):
            raise RecipeError(f"{where}.targets: unknown target {target!r}; use {sorted(LINEAR_GROUPS)} or {LINEAR_NAMES}")
