"""Joint distillation and structured pruning to a size target (DPHuBERT's method), as a recipe step.

Hard-concrete gates (:mod:`..train.gates`) on the chosen ``structures`` are trained together with
the model, which distils the uncompressed base (layer to layer, L1 + cosine), under a Lagrangian
penalty that pulls the gates' expected size to the target (the multipliers learned by gradient
ascent; the target ramps from the model's size over ``target_warmup_steps``). Then the gates are
made hard, the structure completed so that its size is within 1% of ``target_params`` (2% of
``target_macs``) whatever the training reached, the closed groups removed physically with the kept
gate values folded into the weights, and ``final_distillation`` (a recovery mapping) trains the
pruned model.

Options:
- ``structures``: a subset of conv, heads, ffn (FFN units), attention_layers, ffn_layers
  (default [conv, heads, ffn]);
- exactly one of ``target_params`` (parameters of the whole model, as ``num_parameters()``) and
  ``target_macs`` (MACs on 10 s of audio, as ``profile.count_macs``);
- ``target_warmup_steps`` (default 10% of ``steps``, at most ``steps``), ``gate_lr`` and ``lagrangian_lr`` (default
  0.02 each, DPHuBERT's);
- training options as recovery has (``audio``, ``steps``, ``lr``, ...); the default layer pairs
  are DPHuBERT's: the encoder input and the layers at a third, two thirds and all of the depth
  (0, 4, 8, 12 for 12 layers);
- ``final_distillation``: training options of the distillation after pruning (same default pairs).
Training checkpoints: ``step-I-training.pt`` (joint phase) and ``step-I-final.pt``.
"""

from __future__ import annotations

import sys
from typing import Any

from ..delta import Structure
from ..model import SpeechTransformer
from ..profile import count_macs
from ..recipe import STEP_VALIDATORS, RecipeError
from ..train.cluster_head import cluster_head_of
from ..train.distill import CLUSTER_KL, TrainOptions, train_distillation
from ..train.gates import (
    DEFAULT_STRUCTURES,
    MACS,
    PARAMS,
    STRUCTURES,
    GateError,
    Gates,
    SizeConstraint,
    minimum_kept,
    choose_structure,
    fold_and_prune,
    gated,
)
from . import MAC_SECONDS, STEPS, StepContext
from .options import check_number, check_training_options, is_number

STEP_OPTIONS = ("structures", "target_params", "target_macs", "target_warmup_steps", "gate_lr", "lagrangian_lr",
                "final_distillation")
GATE_LR = LAGRANGIAN_LR = 0.02  # DPHuBERT's reg_learning_rate, for both
TOLERANCE = {PARAMS: 0.01, MACS: 0.02}


def _training_options(step: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in step.items() if k not in (*STEP_OPTIONS, "method")}


def validate(step: dict[str, Any], where: str) -> None:
    if "recovery" in step:
        raise RecipeError(f"{where}.recovery: joint pruning trains already; give the training after pruning "
                          "as `final_distillation:`")
    structures = step.get("structures", list(DEFAULT_STRUCTURES))
    if (not isinstance(structures, list) or not structures or not all(isinstance(s, str) for s in structures)
            or len(set(structures)) != len(structures)):
        raise RecipeError(f"{where}.structures: expected a non-empty list of distinct names from {list(STRUCTURES)}, "
                          f"got {structures!r}")
    unknown = [s for s in structures if s not in STRUCTURES]
    if unknown:
        raise RecipeError(f"{where}.structures: unknown {unknown}; known: {list(STRUCTURES)}")
    targets = [name for name in ("target_params", "target_macs") if name in step]
    if len(targets) != 1:
        raise RecipeError(f"{where}: give exactly one of target_params (parameters of the pruned model) and "
                          f"target_macs (its MACs on {MAC_SECONDS:g} s of audio), got {targets or 'neither'}")
    target = step[targets[0]]
    if not is_number(target) or target < 1:
        raise RecipeError(f"{where}.{targets[0]}: expected a positive number (e.g. 23.6e6), got {target!r}")
    for name in ("gate_lr", "lagrangian_lr"):
        check_number(step, where, name)
    check_number(step, where, "target_warmup_steps", integer=True, zero_ok=True)
    training = _training_options(step)
    check_training_options(training, where)  # target_warmup_steps beyond steps is capped (runs cut for smoke tests)
    if "final_distillation" in step:
        check_training_options(step["final_distillation"], f"{where}.final_distillation")


def dphubert_pairs(student: SpeechTransformer, teacher: SpeechTransformer) -> list[list[int]]:
    """DPHuBERT's layer-to-layer pairs: state 0 and the layers at 1/3, 2/3 and 3/3 of the depth.

    DPHuBERT's run.sh distils layers 0, 4, 8, 12 of HuBERT Base, each student layer to the same
    teacher layer; a student of another depth maps proportionally.
    """
    depth, teacher_depth = student.config.num_layers, teacher.config.num_layers
    layers = sorted({0, *(round(depth * k / 3) for k in (1, 2, 3))})
    return [[layer, round(layer * teacher_depth / depth)] for layer in layers]


def _options(training: dict[str, Any], pairs: list[list[int]]) -> TrainOptions:
    options = TrainOptions.from_dict(training)
    if options.pairs is None and options.objective != CLUSTER_KL:
        options.pairs = pairs
    return options


def joint_prune(
    model: SpeechTransformer, structure: Structure, step: dict[str, Any], context: StepContext
) -> tuple[SpeechTransformer, Structure]:
    where = f"steps[{context.index}]"
    base = context.base
    teacher = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    pairs = dphubert_pairs(model, teacher)
    options = _options(_training_options(step), pairs)
    structures = step.get("structures", list(DEFAULT_STRUCTURES))
    try:
        gates = Gates(model.config, structures, seed=options.seed)
    except GateError as error:
        raise RecipeError(f"{where}.structures: {error}") from error
    measure, field = (PARAMS, "target_params") if "target_params" in step else (MACS, "target_macs")
    warmup = step.get("target_warmup_steps", options.steps // 10)
    constraint = SizeConstraint(gates, measure, step[field], min(warmup, options.steps),
                                step.get("gate_lr", GATE_LR), step.get("lagrangian_lr", LAGRANGIAN_LR), MAC_SECONDS)
    smallest = constraint.size(gates.counts({key.name: list(range(minimum_kept(key))) for key in gates.keys}))
    if not smallest <= constraint.target < constraint.full:
        raise RecipeError(f"{where}.{field}: {step[field]:,} is outside what pruning {structures} can reach "
                          f"from this model: from {smallest:,} (everything prunable removed) up to, "
                          f"not including, its size {int(constraint.full):,}")
    head = cluster_head_of(base, options.logit_temperature) if options.objective == CLUSTER_KL else None
    with gated(model, gates):
        train_distillation(model, teacher, options, context.training_checkpoint,
                           description=f"{context.label} joint pruning", teacher_head=head,
                           origin=context.training_origin(model, structure), extra=constraint)
    model.cpu().eval()
    constraint.cpu().eval()

    kept, size = choose_structure(constraint, TOLERANCE[measure])
    off = abs(size - constraint.target) / constraint.target
    if off > TOLERANCE[measure]:
        print(f"{context.label}: warning: the structures {structures} "
              f"cannot reach {field} {constraint.target:,.0f} within {TOLERANCE[measure]:.0%}; the closest is "
              f"{size:,} ({off:.1%} off). Add finer structures (ffn, heads) to reach it.",
              file=sys.stderr, flush=True)
    fold_and_prune(model, structure, gates, kept, base.config)
    actual = model.num_parameters() if measure == PARAMS else count_macs(model, MAC_SECONDS)
    if actual != size:  # the analytic count and the built model must agree, or the target is not met
        raise RuntimeError(f"pruned model has {actual:,} {measure}, the analytic count said {size:,}")
    print(f"{context.label}: pruned to {actual:,} {measure} (target {constraint.target:,.0f})",
          file=sys.stderr, flush=True)

    if "final_distillation" in step:
        final = _options(step["final_distillation"], dphubert_pairs(model, teacher))
        final_head = cluster_head_of(base, final.logit_temperature) if final.objective == CLUSTER_KL else None
        train_distillation(model, teacher, final, context.work_dir / f"step-{context.index}-final.pt",
                           description=f"{context.label} final distillation", teacher_head=final_head,
                           origin=context.training_origin(model, structure))
        model.cpu().eval()
    return model, structure


STEP_VALIDATORS["joint_pruning"] = validate
STEPS["joint_pruning"] = joint_prune
