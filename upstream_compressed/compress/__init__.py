"""Compression: run a recipe's steps on a base checkpoint and describe the result as a delta.

Each technique lives in its own module here and registers a validator in
``recipe.STEP_VALIDATORS`` and a step function in :data:`STEPS`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..bases import FAMILY_OF_FORMAT, resolve_base
from ..delta import Delta, Structure, make_delta, sha256_file
from ..model import ModelConfig, SpeechTransformer
from ..model.convert import Converted, load_base
from ..recipe import Recipe, RecipeError, technique_name
from ..profile import count_macs
from ..train.cluster_head import NoClusterHeadError, cluster_head_of
from ..train.distill import CLUSTER_KL, TrainOptions, differences, save_checkpoint, train_distillation

# The files run_recipe writes in a work folder (and the temporary files of their atomic writes):
# cleaning a work folder removes these and nothing else.
_WORK_NAME = r"(?:after-step-\d+|step-\d+-training|step-\d+-final)\.pt"
WORK_FILE = re.compile(rf"{_WORK_NAME}|\.{_WORK_NAME}\.\w+\.tmp")


@dataclass
class StepContext:
    """What a step may need besides the model: the base, where to keep training checkpoints, and
    ``origin`` (the recipe up to this step and the base's sha256; see :func:`work_origin`)."""

    base: Converted
    work_dir: Path
    index: int
    origin: dict[str, Any]

    @property
    def label(self) -> str:
        return f"step {self.index}"

    @property
    def training_checkpoint(self) -> Path:
        return self.work_dir / f"step-{self.index}-training.pt"

    def training_origin(self, model: SpeechTransformer, structure: Structure) -> dict[str, Any]:
        """What this step's training checkpoint records: the origin plus the structure it trains."""
        return _normalised({**self.origin, "structure": structure.to_dict(), "config": model.config.to_dict()})


# method -> step(model, structure, step_options, context) -> (model, structure)
StepFunction = Callable[[SpeechTransformer, Structure, dict[str, Any], StepContext], tuple[SpeechTransformer, Structure]]
EXPENSIVE_METHODS = {"distillation", "joint_pruning"}  # steps that train: snapshot after them so a rerun resumes
STEPS: dict[str, StepFunction] = {}
MAC_SECONDS = 10.0  # MACs in manifests are for this much audio


def base_identity(spec: str, path: Path, base: Converted) -> dict[str, Any]:
    """What a delta records about its base, so loading can find and verify it."""
    identity = {
        "name": spec,
        "path": str(path),
        "file_name": path.name,
        "sha256": sha256_file(path),
        "format": base.source_format,
        "family": FAMILY_OF_FORMAT[base.source_format],
    }
    if "mean_std" in base.extras:  # MelHuBERT: the fbank statistics are part of the base
        stats = Path(base.extras["mean_std"]).resolve()
        identity["mean_std"] = {"path": str(stats), "file_name": stats.name, "sha256": sha256_file(stats)}
    return identity


def _normalised(data: Any) -> Any:
    """``data`` as JSON gives it back (sorted keys, lists for tuples): the form work files record."""
    return json.loads(json.dumps(data, sort_keys=True))


def work_origin(recipe: Recipe, index: int, identity: dict[str, Any]) -> dict[str, Any]:
    """What the work of step ``index`` derives from: the recipe's steps up to it and the base by content.

    The base (and a MelHuBERT base's fbank statistics) are named by sha256, not by path: a base
    that moved or is named otherwise is still the same base.
    """
    recipe_part = {k: v for k, v in recipe.to_dict().items() if k not in ("base", "mean_std")}
    origin = {"recipe": {**recipe_part, "steps": recipe.steps[: index + 1]}, "base_sha256": identity["sha256"]}
    if "mean_std" in identity:
        origin["mean_std_sha256"] = identity["mean_std"]["sha256"]
    return _normalised(origin)


def _restore_snapshot(
    work_dir: Path, recipe: Recipe, identity: dict[str, Any]
) -> tuple[int, SpeechTransformer, Structure] | None:
    """The latest finished step whose snapshot was made from this base and these steps, if any.

    A snapshot made from anything else is not used (that step and the later ones run again); the
    message names what differs.
    """
    for i in reversed(range(len(recipe.steps))):
        path = work_dir / f"after-step-{i}.pt"
        if not path.is_file():
            continue
        snapshot = torch.load(path, map_location="cpu", weights_only=True)
        changed = differences(snapshot.get("origin"), work_origin(recipe, i, identity), "origin")
        if changed:
            print(f"not resuming from {path}: it was made from other work ({'; '.join(changed[:4])})",
                  file=sys.stderr, flush=True)
            continue
        model = SpeechTransformer.from_state_dict(ModelConfig.from_dict(snapshot["config"]), snapshot["state_dict"])
        return i, model, Structure.from_dict(snapshot["structure"])
    return None


def clean_work_dir(work_dir: Path, remove_folder: bool) -> None:
    """Remove the files :func:`run_recipe` writes in ``work_dir``; other files stay.

    With ``remove_folder`` (a folder compress made), the folder goes too if that left it empty.
    """
    if not work_dir.is_dir():
        return
    for path in work_dir.iterdir():
        if WORK_FILE.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink()
    if remove_folder:
        try:
            work_dir.rmdir()  # fails, as it should, when something else is in it
        except OSError:
            pass


def _recover(model: SpeechTransformer, structure: Structure, options: dict[str, Any], context: StepContext) -> None:
    """Recovery training: distil the uncompressed base into the compressed model (no labels)."""
    base = context.base
    teacher = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    train_options = TrainOptions.from_dict(options)
    head = cluster_head_of(base, train_options.logit_temperature) if train_options.objective == CLUSTER_KL else None
    train_distillation(model, teacher, train_options, context.training_checkpoint,
                       description=f"{context.label} recovery", teacher_head=head,
                       origin=context.training_origin(model, structure))
    model.cpu().eval()


def limit_training_steps(recipe: Recipe, limit: int) -> Recipe:
    """``recipe`` with every training loop (distillation steps, recoveries) cut to at most ``limit`` steps.

    For smoke runs of full-size recipes: the cut is written into the recipe itself, so the delta's
    manifest says how little it trained and its work files can never pass for a full run's.
    """
    default = TrainOptions.__dataclass_fields__["steps"].default

    def cut(options: dict[str, Any]) -> dict[str, Any]:
        return {**options, "steps": min(int(options.get("steps", default)), limit)}

    steps = []
    for step in recipe.steps:
        step = cut(step) if step["method"] in EXPENSIVE_METHODS else dict(step)
        if isinstance(step.get("recovery"), dict):
            step["recovery"] = cut(step["recovery"])
        if isinstance(step.get("final_distillation"), dict):  # joint pruning's training after pruning
            step["final_distillation"] = cut(step["final_distillation"])
        steps.append(step)
    return dataclasses.replace(recipe, steps=steps)


def _check_cluster_heads(recipe: Recipe, base: Converted) -> None:
    """Refuse ``objective: cluster_kl`` before any work when the base has no cluster head to learn from."""
    for i, step in enumerate(recipe.steps):
        for where, options in ((f"steps[{i}]", step), (f"steps[{i}].recovery", step.get("recovery") or {})):
            if options.get("objective") == CLUSTER_KL:
                try:
                    cluster_head_of(base)
                except NoClusterHeadError as error:
                    raise RecipeError(f"{where}.objective: {error}") from error


def run_recipe(recipe: Recipe, refresh: bool = False, work_dir: str | Path | None = None) -> Delta:
    """Apply every step of ``recipe`` to its base and return the delta.

    With ``work_dir``, training checkpoints and a snapshot after every step that trains are kept
    there, so a killed run started again with the same recipe continues where it stopped. Each file
    records its origin (:func:`work_origin`); one made from another recipe, base or structure is not
    reused: that step starts from scratch, with a message naming what differs. Resuming prints
    ``resuming: after step I from PATH`` (a snapshot) and ``training: step I ... start=S end=N``
    (S > 0: a training checkpoint) to stderr.
    """
    relative_to = recipe.source.parent if recipe.source else None
    base_path = resolve_base(recipe.base, relative_to=relative_to, refresh=refresh)
    mean_std = None
    if recipe.mean_std is not None:
        mean_std = Path(os.path.expandvars(os.path.expanduser(recipe.mean_std)))
        if not mean_std.is_absolute() and relative_to is not None:
            mean_std = relative_to / mean_std
        if not mean_std.is_file():
            raise RecipeError(f"recipe mean_std: file {mean_std} does not exist")
    base = load_base(base_path, mean_std=mean_std)
    identity = base_identity(recipe.base, base_path, base)
    for i, step in enumerate(recipe.steps):  # layer indices can only be checked against the base
        layers = step.get("layers") or []
        if any(layer >= base.config.num_layers for layer in layers):
            raise RecipeError(f"steps[{i}].layers: {layers} names a layer beyond the base's {base.config.num_layers}")
    _check_cluster_heads(recipe, base)

    with tempfile.TemporaryDirectory(prefix="upstream_compressed_") as scratch:
        work = Path(work_dir) if work_dir is not None else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        first, restored = 0, _restore_snapshot(work, recipe, identity)
        if restored is not None:
            done, model, structure = restored
            first = done + 1
            print(f"resuming: after step {done} from {work / f'after-step-{done}.pt'}", file=sys.stderr, flush=True)
        else:
            model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
            structure = Structure.identity(base.config)
        for i in range(first, len(recipe.steps)):
            step = recipe.steps[i]
            options = {k: v for k, v in step.items() if k != "recovery"}
            print(f"step {i}: {step['method']} ...", file=sys.stderr, flush=True)
            context = StepContext(base, work, i, work_origin(recipe, i, identity))
            model, structure = STEPS[step["method"]](model, structure, options, context)
            if "recovery" in step:
                _recover(model, structure, step["recovery"], context)
            print(f"step {i}: {step['method']} done, {model.num_parameters():,} parameters", file=sys.stderr, flush=True)
            if ("recovery" in step or step["method"] in EXPENSIVE_METHODS) and work_dir is not None:
                save_checkpoint(work / f"after-step-{i}.pt", {
                    "origin": context.origin, "config": model.config.to_dict(), "state_dict": model.state_dict(),
                    "structure": structure.to_dict(),
                })
    base_model = SpeechTransformer.from_state_dict(base.config, base.state_dict, share=True)
    macs = {"seconds": MAC_SECONDS, "base": count_macs(base_model, MAC_SECONDS), "compressed": count_macs(model, MAC_SECONDS)}
    return make_delta(base, identity, model, structure, recipe.to_dict(), technique_name(recipe.steps), {"macs": macs})


# Importing the technique modules registers their steps and validators.
from . import conv_pruning, distillation, head_pruning, joint_pruning, low_rank, row_pruning, weight_pruning  # noqa: E402,F401
