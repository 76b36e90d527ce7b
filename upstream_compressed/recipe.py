"""Compression recipes: a YAML file that names a base and an ordered list of steps.

```yaml
base: /path/to/hubert_base_ls960.pt   # or a known name: hubert_base, distilhubert_base
steps: []                             # no step: the identity delta
```
A MelHuBERT base may add ``mean_std: PATH`` (its fbank statistics .npy) unless that file lies beside
the checkpoint as ``<stem>.mean-std.npy`` or ``mean-std.npy``.
Recipes are validated completely before any work starts; errors name the field.
Paths in a recipe file (``base``, ``mean_std``, ``audio``) are relative to the recipe's folder, after
``~`` and ``${VAR}`` are expanded (:mod:`upstream_compressed.bundled` states the rule).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .files import read_yaml

# Short names used to build technique names such as ``kd_head_lr``.
SHORT_NAMES = {
    "distillation": "kd",
    "head_pruning": "head",
    "row_pruning": "row",
    "low_rank": "lr",
    "weight_pruning": "wp",
    "joint_pruning": "joint",
    "conv_pruning": "conv",
}
# A single technique reads better spelled out: ``hubert_headpruned``.
SINGLE_NAMES = {
    "distillation": "kd",
    "head_pruning": "headpruned",
    "row_pruning": "rowpruned",
    "low_rank": "lowrank",
    "weight_pruning": "weightpruned",
    "joint_pruning": "jointpruned",
    "conv_pruning": "convpruned",
}
IDENTITY = "identity"

# method -> validator(step, where) raising RecipeError; filled in by the compression modules.
STEP_VALIDATORS: dict[str, Callable[[dict[str, Any], str], None]] = {}


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the field."""


@dataclass
class Recipe:
    base: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    source: Path | None = None  # the file it was read from; relative base paths resolve against it
    mean_std: str | None = None  # a MelHuBERT base's fbank statistics file

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"base": self.base, "steps": self.steps}
        if self.mean_std is not None:
            data["mean_std"] = self.mean_std
        return data


def technique_name(steps: list[dict[str, Any]]) -> str:
    """``identity``, a single technique (``headpruned``) or a combination (``kd_head_lr``).

    Repeating a method (an iterative schedule) does not change the name.
    """
    methods: list[str] = []
    for step in steps:
        if not methods or methods[-1] != step["method"]:
            methods.append(step["method"])
    if not methods:
        return IDENTITY
    if len(set(methods)) == 1:
        return SINGLE_NAMES[methods[0]]
    return "_".join(SHORT_NAMES[m] for m in methods)


def parse_recipe(data: Any, source: str | os.PathLike | None = None) -> Recipe:
    from . import compress  # noqa: F401  (registers every technique's validator)

    where = f"recipe {source}" if source else "recipe"
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping with `base` and `steps`, got {type(data).__name__}")
    unknown = set(data) - {"base", "steps", "mean_std"}
    if unknown:
        raise RecipeError(
            f"{where}: unknown top-level field(s) {sorted(map(str, unknown))}; expected `base`, `steps` (and `mean_std`)"
        )
    mean_std = data.get("mean_std")
    if mean_std is not None and (not isinstance(mean_std, str) or not mean_std.strip()):
        raise RecipeError(f"{where}: field `mean_std` must be the path of a MelHuBERT fbank statistics .npy")
    base = data.get("base")
    if not isinstance(base, str) or not base.strip():
        raise RecipeError(f"{where}: field `base` is missing; give a checkpoint path or a known name")
    steps = data.get("steps")
    steps = [] if steps is None else steps  # `steps:` left empty: the identity
    if not isinstance(steps, list):
        raise RecipeError(f"{where}: field `steps` must be a list")
    for i, step in enumerate(steps):
        here = f"{where}: steps[{i}]"
        if not isinstance(step, dict) or "method" not in step:
            raise RecipeError(f"{here}: each step needs a `method` field")
        method = step["method"]
        if not isinstance(method, str) or method not in SHORT_NAMES:
            raise RecipeError(f"{here}.method: unknown method {method!r}; known: {sorted(SHORT_NAMES)}")
        if method not in STEP_VALIDATORS:
            raise RecipeError(f"{here}.method: {method!r} is not implemented in this version yet")
        STEP_VALIDATORS[method](step, here)
    return Recipe(base=base, steps=steps, source=Path(source) if source else None, mean_std=mean_std)


def load_recipe(path: str | os.PathLike, base: str | None = None) -> Recipe:
    """Read, validate and resolve a recipe file (a path or a bundled name such as ``tiny/kd``).

    ``base`` (a path from the current folder or a known name) replaces the recipe's own base. The
    paths inside (``base``, ``mean_std``, every ``audio``) come back absolute, by the rule of
    :mod:`upstream_compressed.bundled`: relative to the recipe's folder, after ``~`` and ``${VAR}``.
    """
    from .bundled import bundled_recipe, find_file

    path = find_file(path, bundled_recipe, RecipeError)
    data = read_yaml(path, RecipeError, f"recipe {path}")
    if base is not None and isinstance(data, dict):
        data = {**data, "base": base}
    recipe = parse_recipe(data, path)
    return _resolve_paths(recipe, path.parent, base_folder=Path.cwd() if base is not None else path.parent)


def _resolve_paths(recipe: Recipe, folder: Path, base_folder: Path) -> Recipe:
    """The recipe with its paths absolute; a missing one is refused naming the file and the field."""
    from .bases import KNOWN_BASES
    from .bundled import file_or_name, resolve_path
    from .embedded import BUNDLED

    where = f"recipe {recipe.source}"
    base = file_or_name(recipe.base, base_folder, f"{where}: base", RecipeError, {*KNOWN_BASES, *BUNDLED})
    mean_std = recipe.mean_std and str(resolve_path(recipe.mean_std, folder, f"{where}: mean_std", RecipeError,
                                                    must_be="file"))

    def audio(options: dict[str, Any], here: str) -> dict[str, Any]:
        if "audio" not in options:
            return options
        return {**options, "audio": str(resolve_path(options["audio"], folder, f"{here}.audio", RecipeError,
                                                     must_be="folder"))}

    steps = []
    for i, step in enumerate(recipe.steps):
        step = audio(step, f"{where}: steps[{i}]")
        if isinstance(step.get("recovery"), dict):
            step = {**step, "recovery": audio(step["recovery"], f"{where}: steps[{i}].recovery")}
        if isinstance(step.get("final_distillation"), dict):  # joint pruning's training after pruning
            step = {**step, "final_distillation": audio(step["final_distillation"],
                                                        f"{where}: steps[{i}].final_distillation")}
        steps.append(step)
    return replace(recipe, base=base, steps=steps, mean_std=mean_std)
