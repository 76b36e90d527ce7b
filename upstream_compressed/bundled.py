"""The plans, recipes and downstream configs shipped inside the package, found by name.

In a checkout ``recipes/`` and ``downstream_configs/`` at the repository root are links to these
folders, so the same files are reached by path there and by name from anywhere once installed.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
RECIPES = PACKAGE_ROOT / "recipes"
DOWNSTREAM_CONFIGS = PACKAGE_ROOT / "downstream_configs"


def bundled_plan(name: str) -> Path | None:
    """``quick`` or ``tiny`` (or ``quick/plan``) -> the bundled plan file, if there is one."""
    name = name.removesuffix(".yaml").removesuffix("/plan")
    path = RECIPES / name / "plan.yaml"
    return path if path.is_file() else None


def bundled_recipe(name: str) -> Path | None:
    """``tiny/kd`` (or ``recipes/tiny/kd.yaml``) -> the bundled recipe file, if there is one."""
    name = name.removeprefix("recipes/").removesuffix(".yaml")
    path = RECIPES / f"{name}.yaml"
    return path if path.is_file() and path.name != "plan.yaml" else None


def bundled_config(name: str) -> Path | None:
    """``ctc_libriphone_quick`` (or ``downstream_configs/ctc_libriphone_quick.yaml``) -> the bundled config."""
    name = name.removeprefix("downstream_configs/").removesuffix(".yaml")
    path = DOWNSTREAM_CONFIGS / f"{name}.yaml"
    return path if path.is_file() else None


def bundled_names() -> dict[str, list[str]]:
    """Every bundled plan, recipe and config by the name that finds it."""
    return {
        "plans": sorted(p.parent.name for p in RECIPES.glob("*/plan.yaml")),
        "recipes": sorted(str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.glob("*/*.yaml") if p.name != "plan.yaml"),
        "configs": sorted(p.stem for p in DOWNSTREAM_CONFIGS.glob("*.yaml")),
    }
