"""The package works wherever it is installed: the wheel holds every bundled file, an installed copy
runs the main job from an empty folder, and paths inside plans and recipes follow one rule."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

from upstream_compressed.bundled import PACKAGE_ROOT, bundled_names, expand
from upstream_compressed.experiments import PlanError, load_plan
from upstream_compressed.recipe import RecipeError, load_recipe

REPO = PACKAGE_ROOT.parent
PACKAGE = PACKAGE_ROOT.name


def package_files() -> set[str]:
    """Every file of the package's source tree (code and data), as the wheel names it."""
    return {p.relative_to(REPO).as_posix() for p in PACKAGE_ROOT.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps .`` of a copy of the project (the build must not write into the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(PACKAGE_ROOT, source / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "setup.py", source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                    "-w", str(root / "dist")], check=True, capture_output=True)
    return next((root / "dist").glob("upstream_compressed-*.whl"))


def test_the_wheel_holds_every_file_of_the_package(wheel):
    """Code and data alike: a recipe, config or corpus file that package_data misses fails here."""
    names = set(zipfile.ZipFile(wheel).namelist())
    inside = {n for n in names if n.startswith(f"{PACKAGE}/")}
    missing = package_files() - inside
    assert not missing, f"not in the wheel (add them to setup.py's package_data): {sorted(missing)}"
    bundled = bundled_names()
    assert {"quick", "tiny"} <= set(bundled["plans"]) and "tiny/kd" in bundled["recipes"]
    assert {f"{PACKAGE}/recipes/{r}.yaml" for r in bundled["recipes"]} <= inside
    assert {f"{PACKAGE}/downstream_configs/{c}.yaml" for c in bundled["configs"]} <= inside
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "upstream-compressed = upstream_compressed.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed (not editable); torch and S3PRL are taken
    from this project's environment through a .pth line, so nothing is downloaded or rebuilt."""
    environment = tmp_path_factory.mktemp("venv") / "env"
    venv.EnvBuilder(with_pip=False).create(environment)
    python = environment / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # A plain path line: this environment's packages become importable, its .pth files (the editable
    # install's finder among them) are not run, so the checkout cannot be imported by accident.
    (Path(purelib) / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True)
    return environment


def clean_env(environment: Path) -> dict[str, str]:
    """The user's shell after activating ``environment``: no checkout on the path, no CORPUS."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CORPUS", "VIRTUAL_ENV")}
    return {**env, "PATH": f"{environment / 'bin'}{os.pathsep}{env.get('PATH', '')}", "OMP_NUM_THREADS": "1"}


def test_installed_package_runs_the_main_job_from_an_empty_folder(installed, tmp_path):
    """The must-show, from an empty folder: make-corpus (small options), then the quick plan by name."""
    empty = tmp_path / "empty"
    empty.mkdir()
    env = clean_env(installed)
    where = subprocess.run(["python", "-c", "import upstream_compressed; print(upstream_compressed.__file__)"],
                           cwd=empty, env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(installed) and not Path(where).is_relative_to(REPO), where
    command = ("upstream-compressed make-corpus c --speakers 3 --utterances 4 --sid-utterances 5 --quiet && "
               "upstream-compressed experiment quick --corpus c --expdir e --models base --tasks pr --pr-steps 2")
    run = subprocess.run(command, shell=True, cwd=empty, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((empty / "e" / "downstream" / "pr_base" / "result.json").read_text())
    assert result["task"] == "PR" and result["steps"] == 2 and 0.0 <= result["test"]
    assert "PR   base" in run.stdout
    model = json.loads((empty / "e" / "models" / "base" / "model.json").read_text())
    assert Path(model["ckpt"]).is_relative_to(installed)  # the bundled base, from the installed copy


# ----------------------------------------------------------------------------------- the path rule
@pytest.fixture
def project(tmp_path, hubert_ckpt, audio_dir):
    """A user's own project: a plan beside its data and base, a recipe one folder down, all relative."""
    root = tmp_path / "project"
    shutil.copytree(audio_dir, root / "mydata" / "LibriSpeech" / "train-clean-100")
    shutil.copy(hubert_ckpt, root / "base.pt")
    (root / "recipes").mkdir()
    (root / "recipes" / "mine.yaml").write_text(yaml.safe_dump({"base": "../base.pt", "steps": [{
        "method": "head_pruning", "ratio": 0.5, "criterion": "data_driven", "max_utterances": 2,
        "audio": "../mydata/LibriSpeech/train-clean-100",  # relative to the recipe's folder
        "recovery": {"audio": "${CORPUS}/LibriSpeech/train-clean-100", "steps": 1, "batch_size": 1,
                     "max_seconds": 1.0},  # the plan's corpus, set for the compression
    }]}))
    (root / "plan.yaml").write_text(yaml.safe_dump({
        "corpus": "./mydata", "base": "./base.pt", "pr_config": "ctc_libriphone_tiny", "sid_config": "voxceleb1_tiny",
        "models": [{"name": "base", "method": "base", "upstream": "hubert_local"},
                   {"name": "mine", "method": "head_pruning", "rate": 0.5, "recipe": "recipes/mine.yaml",
                    "upstream": "hubert_headpruned"}],
    }))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return root, elsewhere


def test_a_users_plan_and_recipe_resolve_against_their_own_folders(project, monkeypatch):
    """Run from another folder: every relative path is read from the file that names it."""
    from upstream_compressed.cli import main
    from upstream_compressed.delta import read_delta

    root, elsewhere = project
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("CORPUS", raising=False)
    plan = load_plan("../project/plan.yaml")
    assert plan.corpus == root / "mydata" and plan.base == str(root / "base.pt")
    assert plan.models[1].recipe == str(root / "recipes" / "mine.yaml")
    umask = os.umask(0o022)
    try:  # relative --expdir: the compressions, run as subprocesses, write where this call runs
        assert main(["experiment", "../project/plan.yaml", "--expdir", "exp", "--no-downstream", "--quiet"]) == 0
    finally:
        os.umask(umask)
    assert stat.S_IMODE((elsewhere / "exp" / "models" / "mine" / "model.json").stat().st_mode) == 0o644
    manifest = read_delta(elsewhere / "exp" / "models" / "mine" / "delta.safetensors").manifest
    step = manifest["recipe"]["steps"][0]
    assert step["audio"] == step["recovery"]["audio"] == str(root / "mydata" / "LibriSpeech" / "train-clean-100")
    assert manifest["base"]["path"] == str(root / "base.pt")
    assert json.loads((elsewhere / "exp" / "models" / "base" / "model.json").read_text())["ckpt"] == str(root / "base.pt")
    assert not list(Path.cwd().glob("mydata")) and not (root / "exp").exists()  # nothing read or written elsewhere


def test_a_missing_path_is_refused_naming_the_file_and_the_field(project, monkeypatch):
    root, elsewhere = project
    monkeypatch.chdir(root)  # the path exists from here, but not from the recipe's folder
    recipe = root / "recipes" / "mine.yaml"
    data = yaml.safe_load(recipe.read_text())
    data["steps"][0]["audio"] = "mydata/LibriSpeech/train-clean-100"
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=rf"recipe {recipe}: steps\[0\]\.audio: folder "
                                          rf"{root}/recipes/mydata/LibriSpeech/train-clean-100 does not exist "
                                          rf"\(a relative path is relative to {root}/recipes"):
        load_recipe(recipe)
    monkeypatch.delenv("CORPUS", raising=False)
    data["steps"][0]["audio"] = "../mydata/LibriSpeech/train-clean-100"
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=r"steps\[0\]\.recovery\.audio: environment variable CORPUS is not set"):
        load_recipe(recipe)
    plan = root / "plan.yaml"
    plan.write_text(plan.read_text().replace("recipe: recipes/mine.yaml", "recipe: mine.yaml"))
    with pytest.raises(PlanError, match=rf"{plan}: models\[1\]\.recipe: file {root}/mine.yaml does not exist .*"
                                        r"no bundled recipe name \(group/name, e\.g\. tiny/kd"):
        load_plan(plan)


def test_variables_and_home_are_expanded_first(project, monkeypatch):
    """``~`` and ``${VAR}``; a variable holding a relative path is read from the current folder."""
    root, elsewhere = project
    monkeypatch.setenv("HOME", str(root))
    monkeypatch.chdir(root)
    monkeypatch.setenv("CORPUS", "mydata")  # as `CORPUS=mydata upstream-compressed compress ...` from root
    recipe = root / "recipes" / "mine.yaml"
    recipe.write_text(recipe.read_text().replace("../base.pt", "~/base.pt"))
    monkeypatch.chdir(elsewhere)
    with pytest.raises(RecipeError, match=rf"recovery\.audio: folder {elsewhere}/mydata/LibriSpeech"):
        load_recipe(recipe)  # CORPUS=mydata is read from here, where there is none
    monkeypatch.chdir(root)
    loaded = load_recipe(recipe)
    assert loaded.base == str(root / "base.pt")
    assert loaded.steps[0]["recovery"]["audio"] == str(root / "mydata" / "LibriSpeech" / "train-clean-100")
    assert expand("a/${CORPUS}/b", "x") == "a/mydata/b"  # only a leading variable is a path of its own


def test_a_bundled_recipe_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CORPUS", str(tmp_path))
    (tmp_path / "LibriSpeech" / "train-clean-100").mkdir(parents=True)
    recipe = load_recipe("tiny/kd")
    assert recipe.source == PACKAGE_ROOT / "recipes" / "tiny" / "kd.yaml"
    assert recipe.steps[0]["audio"] == str(tmp_path / "LibriSpeech" / "train-clean-100")
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "kd").write_text("base: tiny_hubert\nsteps: []\n")  # a file of that name comes first
    assert load_recipe("tiny/kd").steps == []
    with pytest.raises(RecipeError, match=r"recipe tiny/nope does not exist, and it is no bundled recipe name"):
        load_recipe("tiny/nope")
