"""Knowledge distillation into a shallower student (DistilHuBERT's recipe), as a recipe step.

The student takes the current model's front end and its first ``student_layers`` layers as
initialisation (so the delta stores only what training changed), then learns from the current
model (the teacher) on unlabelled audio:
- ``variant: heads`` (default): prediction heads on the last student layer predict teacher layers
  ``pred_layers`` (default: a third, two thirds and all of the teacher's depth, i.e. 4, 8, 12 for
  12 layers), L1 + cosine per head;
- ``variant: layer_to_layer``: student layer i mimics teacher layer k·i (k = teacher / student depth).
Training options are those of recovery (``audio``, ``steps``, ``lr``, ``batch_size``, ...).
"""

from __future__ import annotations

import copy
from typing import Any

from ..delta import Structure
from ..model import SpeechTransformer
from ..recipe import STEP_VALIDATORS, RecipeError
from ..train.distill import TrainOptions, train_distillation
from . import STEPS, StepContext
from .options import check_choice, check_training_options

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
    config = copy.deepcopy(teacher.config)
    config.layers = config.layers[:student_layers]
    if variant == "heads":
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

    student = SpeechTransformer(config)  # prediction heads keep their random initialisation
    inherited = {k: v for k, v in teacher.state_dict().items() if k in student.state_dict()
                 and not k.startswith("prediction_heads.")}
    student.load_state_dict(inherited, strict=False)
    options = TrainOptions.from_dict({**_training_options(step), "pairs": pairs})
    train_distillation(student, teacher, options, context.work_dir / f"step-{context.index}-training.pt",
                       description=f"{context.label} distillation")
    student.cpu().eval()
    return student, Structure(structure.layers[:student_layers])


STEP_VALIDATORS["distillation"] = validate
STEPS["distillation"] = distill
