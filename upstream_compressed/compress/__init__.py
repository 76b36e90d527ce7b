"""Compression: run a recipe's steps on a base checkpoint and describe the result as a delta.

Each technique lives in its own module here and registers a validator in
``recipe.STEP_VALIDATORS`` and a step function in :data:`STEPS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..bases import FAMILY_OF_KIND, resolve_base
from ..delta import Delta, Structure, make_delta, sha256_file
from ..model import SpeechTransformer
from ..model.convert import Converted, load_base
from ..recipe import Recipe, technique_name

# method -> step(model, structure, step_options, base) -> (model, structure)
StepFunction = Callable[[SpeechTransformer, Structure, dict[str, Any], Converted], tuple[SpeechTransformer, Structure]]
STEPS: dict[str, StepFunction] = {}


def base_identity(spec: str, path: Path, base: Converted) -> dict[str, Any]:
    """What a delta records about its base, so loading can find and verify it."""
    return {
        "name": spec,
        "path": str(path),
        "file_name": path.name,
        "sha256": sha256_file(path),
        "format": base.source_format,
        "family": FAMILY_OF_KIND[base.config.kind],
    }


def run_recipe(recipe: Recipe, refresh: bool = False) -> Delta:
    """Apply every step of ``recipe`` to its base and return the delta."""
    relative_to = recipe.source.parent if recipe.source else None
    base_path = resolve_base(recipe.base, relative_to=relative_to, refresh=refresh)
    base = load_base(base_path)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    model.eval()
    structure = Structure.identity(base.config)
    for step in recipe.steps:
        model, structure = STEPS[step["method"]](model, structure, step, base)
    return make_delta(
        base,
        base_identity(recipe.base, base_path, base),
        model,
        structure,
        recipe.to_dict(),
        technique_name(recipe.steps),
    )


# Importing the technique modules registers their steps and validators.
from . import head_pruning, low_rank, row_pruning  # noqa: E402,F401
