"""Knowledge distillation into a shallower student (DistilHuBERT's recipe), as a recipe step.

The student takes the current model's front end and its first ``student_layers`` layers as
initialisation (so the delta stores only what training changed), then learns from the current
model (the teacher) on unlabelled audio:
- ``variant: heads`` (default): prediction heads on the last student layer predict teacher layers
  ``pred_layers`` (default: a third, two thirds and all of the teacher's depth, i.e. 4, 8, 12 for
  12 layers), L1 + cosine per head;
- ``variant: layer_to_layer``: student layer i mimics teacher layer k·i (k = teacher / student depth);
- ``objective: cluster_kl`` (logit distillation, as in the MelHuBERT compression study; no
  ``variant``): the student, without prediction heads, learns the teacher's cluster posteriors,
  KL(teacher || student) with HuBERT's cosine logits / ``logit_temperature`` (default the
  checkpoint's ``logit_temp``, 0.1). It needs a base with HuBERT's cluster head (``final_proj``,
  ``label_embs_concat``). The student trains its own copy of that head, initialised from the
  base's; the copy is training-only (kept in the training checkpoint for resuming, not in the
  student model, its hidden states or the delta).
Training options are those of recovery (``audio``, ``steps``, ``lr``, ``batch_size``, ...).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..delta import Structure
from ..model import SpeechTransformer
from ..recipe import STEP_VALIDATORS, RecipeError
from ..train.cluster_head import cluster_head_of
from ..train.distill import CLUSTER_KL, TrainOptions, train_distillation
from . import STEPS, StepContext
from .options import check_choice, check_objective, check_training_options

VARIANTS = ("heads", "layer_to_layer")
STEP_OPTIONS = ("student_layers", "pred_layers", "variant")


def _training_options(step: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in step.items() if k not in (*STEP_OPTIONS, "method")}


def validate(step: dict[str, Any], where: str) -> None:
    if "recovery" in step:
        raise RecipeError(f"{where}.recovery: a distillation step trains already; put its options on the step itself")
    layers = step.get("student_layers", 2)
    if isinstance(layers, bool) or not isinstance(layers, int) or layers <= 0:
        raise RecipeError(f"{where}.student_layers: expected a positive integer, got {layers!r}")
    pred = step.get("pred_layers")
    if pred is not None and (not isinstance(pred, list) or not pred or
                             not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in pred)):
        raise RecipeError(f"{where}.pred_layers: expected a list of teacher layer numbers (1-based), got {pred!r}")
    check_choice(step, where, "variant", VARIANTS, "heads")
    check_training_options(_training_options(step), where)
    if check_objective(step, where) == CLUSTER_KL:
        for name in ("variant", "pred_layers"):
            if name in step:
                raise RecipeError(f"{where}.{name}: objective cluster_kl trains the student's encoder output only "
                                  f"(no prediction heads or layer pairs); remove `{name}`")


def default_pred_layers(teacher_layers: int) -> list[int]:
    return sorted({max(1, round(teacher_layers * k / 3)) for k in (1, 2, 3)})


def distill(
    model: SpeechTransformer, structure: Structure, step: dict[str, Any], context: StepContext
) -> tuple[SpeechTransformer, Structure]:
    teacher = model.eval()
    teacher_layers, student_layers = teacher.config.num_layers, step.get("student_layers", 2)
    if student_layers > teacher_layers:
        raise ValueError(f"student_layers {student_layers} exceeds the teacher's {teacher_layers} layers")
    variant = step.get("variant", "heads")
    options = TrainOptions.from_dict(_training_options(step))
    config = copy.deepcopy(teacher.config)
    config.layers = config.layers[:student_layers]
    teacher_head, pairs = None, None
    if options.objective == CLUSTER_KL:
        # The cluster head is the base's (no step changes it); the teacher is the current model,
        # which earlier steps may have compressed.
        teacher_head = cluster_head_of(context.base, options.logit_temperature)
        config.pred_layer_id = []
    elif variant == "heads":
        pred_layers = step.get("pred_layers") or default_pred_layers(teacher_layers)
        if max(pred_layers) > teacher_layers:
            raise ValueError(f"pred_layers {pred_layers} name layers beyond the teacher's {teacher_layers}")
        config.pred_layer_id = list(pred_layers)
        config.pred_inter_dim = config.pred_out_dim = config.embed_dim
        first_head = student_layers + 1  # hidden states: [input/features] + layers, then the heads
        pairs = [[first_head + j, layer] for j, layer in enumerate(pred_layers)]
    else:
        if teacher_layers % student_layers:
            raise ValueError(f"layer_to_layer needs the teacher's depth {teacher_layers} to be a multiple of "
                             f"student_layers {student_layers}")
        ratio = teacher_layers // student_layers
        config.pred_layer_id = []
        pairs = [[i, ratio * i] for i in range(1, student_layers + 1)]

    # Prediction heads keep their random initialisation, drawn from the step's own seed: the same
    # student whatever ran before in this process (a rerun from a snapshot draws what a fresh run did).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        student = SpeechTransformer(config)
    inherited = {k: v for k, v in teacher.state_dict().items() if k in student.state_dict()
                 and not k.startswith("prediction_heads.")}
    student.load_state_dict(inherited, strict=False)
    if pairs is not None:
        options = TrainOptions.from_dict({**_training_options(step), "pairs": pairs})
    student_structure = Structure(structure.layers[:student_layers])
    train_distillation(student, teacher, options, context.training_checkpoint,
                       description=f"{context.label} distillation", teacher_head=teacher_head,
                       origin=context.training_origin(student, student_structure))
    student.cpu().eval()
    return student, student_structure


STEP_VALIDATORS["distillation"] = validate
STEPS["distillation"] = distill
