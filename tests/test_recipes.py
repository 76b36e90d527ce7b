"""Every recipe shipped under recipes/ is valid."""

from pathlib import Path

import pytest

from upstream_compressed.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert recipe.steps
