"""The plans, recipes and downstream configs shipped inside the package, found by name, and the one
rule for the paths written inside a plan or a recipe.

In a checkout ``recipes/`` and ``downstream_configs/`` at the repository root are links to these
folders, so the same files are reached by path there and by name from anywhere once installed.

The path rule (:func:`resolve_path`), for every path a plan or a recipe file names:

1. ``~`` and ``$VAR`` / ``${VAR}`` are expanded; an unset variable is an error naming the field. A
   variable that starts the value and holds a relative path is read as the shell that set it reads
   it: relative to the current folder.
2. A path still relative is relative to the folder of the file that names it (not the current folder).
3. Where a field takes a plan, recipe or downstream config, a value that is no existing file by 1-2
   and is a bundled name (``quick``, ``tiny/kd``, ``ctc_libriphone_embedded``) is the bundled file.

A path given on the command line is relative to the current folder, with the same bundled names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

PACKAGE_ROOT = Path(__file__).resolve().parent
RECIPES = PACKAGE_ROOT / "recipes"
DOWNSTREAM_CONFIGS = PACKAGE_ROOT / "downstream_configs"
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")

Lookup = Callable[[str], "Path | None"]


def _inside(folder: Path, relative: str) -> Path | None:
    """``folder/relative`` if it is a file inside ``folder`` (a name with ``..`` finds nothing outside)."""
    path = (folder / relative).resolve()
    return path if path.is_file() and path.is_relative_to(folder) else None


def bundled_plan(name: str) -> Path | None:
    """``quick`` or ``tiny`` (or ``quick/plan``, ``recipes/quick/plan.yaml``) -> the bundled plan file, if any."""
    name = name.removeprefix("recipes/").removesuffix(".yaml").removesuffix("/plan")
    return _inside(RECIPES, f"{name}/plan.yaml") if "/" not in name else None


def bundled_recipe(name: str) -> Path | None:
    """``tiny/kd`` (or ``recipes/tiny/kd.yaml``) -> the bundled recipe file, if there is one."""
    name = name.removeprefix("recipes/").removesuffix(".yaml")
    path = _inside(RECIPES, f"{name}.yaml") if name.count("/") == 1 else None
    return path if path is not None and path.name != "plan.yaml" else None


def bundled_config(name: str) -> Path | None:
    """``ctc_libriphone_quick`` (or ``downstream_configs/ctc_libriphone_quick.yaml``) -> the bundled config."""
    name = name.removeprefix("downstream_configs/").removesuffix(".yaml")
    return _inside(DOWNSTREAM_CONFIGS, f"{name}.yaml") if "/" not in name else None


def bundled_names() -> dict[str, list[str]]:
    """Every bundled plan, recipe and config by the name that finds it."""
    return {
        "plans": sorted(p.parent.name for p in RECIPES.glob("*/plan.yaml")),
        "recipes": sorted(p.relative_to(RECIPES).with_suffix("").as_posix()
                          for p in RECIPES.glob("*/*.yaml") if p.name != "plan.yaml"),
        "configs": sorted(p.stem for p in DOWNSTREAM_CONFIGS.glob("*.yaml")),
    }


# What each lookup is called in messages, and how a message shows its bundled names.
_KINDS: dict[Lookup, tuple[str, Callable[[], str]]] = {
    bundled_plan: ("plan", lambda: ", ".join(bundled_names()["plans"])),
    bundled_recipe: ("recipe", lambda: f"group/name, e.g. tiny/kd; all: {', '.join(bundled_names()['recipes'])}"),
    bundled_config: ("downstream config", lambda: ", ".join(bundled_names()["configs"])),
}


def expand(value: str, where: str, error: type[Exception] = ValueError) -> str:
    """Rule 1: ``~`` and ``$VAR``/``${VAR}`` expanded; a leading variable's relative path is from the current folder."""
    def substitute(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        found = os.environ.get(name)
        if not found:
            raise error(f"{where}: environment variable {name} is not set (in {value!r})")
        return os.path.abspath(found) if match.start() == 0 else found

    return _VARIABLE.sub(substitute, os.path.expanduser(value))


def resolve_path(value: object, folder: Path, where: str, error: type[Exception] = ValueError, *,
                 bundled: Lookup | None = None, must_be: str | None = None) -> Path:
    """The path a plan or recipe field names (rules 1-3 above), absolute.

    ``folder`` is the folder of the file that names it; ``bundled`` the lookup of rule 3;
    ``must_be`` ``"file"`` or ``"folder"`` refuses anything else, naming ``where`` (file and field).
    """
    if not isinstance(value, str) or not value.strip():
        raise error(f"{where}: expected a path, got {value!r}")
    expanded = expand(value, where, error)
    path = Path(os.path.abspath(Path(folder) / expanded))  # an absolute value replaces folder; '..' is folded
    if bundled is not None and not path.exists() and (named := bundled(expanded)) is not None:
        return named
    exists = {"file": path.is_file, "folder": path.is_dir, None: lambda: True}[must_be]
    if not exists():
        hint = "" if os.path.isabs(expanded) else f" (a relative path is relative to {folder}, the folder of the file)"
        if bundled is not None:
            kind, names = _KINDS[bundled]
            hint += f", and it is no bundled {kind} name ({names()})"
        raise error(f"{where}: {must_be} {path} does not exist{hint}")
    return path


def find_file(value: str | os.PathLike, bundled: Lookup, error: type[Exception] = ValueError) -> Path:
    """A file given on the command line: a path from the current folder, else a bundled name."""
    path = Path(value)
    if path.is_file():
        return path
    named = bundled(str(value))
    if named is None:
        kind, names = _KINDS[bundled]
        raise error(f"{kind} {value} does not exist, and it is no bundled {kind} name ({names()})")
    return named


def file_or_name(value: object, folder: Path, where: str, error: type[Exception], names: set[str]) -> str:
    """A field that takes a file or a known name (a base): the file's absolute path by the rule, else the name."""
    path = resolve_path(value, folder, where, error)
    if path.is_file():
        return str(path)
    if value in names:
        return str(value)
    raise error(f"{where}: {value!r} is neither an existing file nor a known name ({', '.join(sorted(names))}); "
                f"looked for {path}")
