"""A plan of models, each compressed and then scored by SUPERB PR and SID: the main job's engine.

A plan (YAML) lists models; each is the base itself, a recipe compressed into a delta, an existing
checkpoint, S3PRL's ``fbank`` baseline, or the base architecture with random weights::

    corpus: ./mydata                        # a make-corpus folder (LibriSpeech + VoxCeleb1 trees)
    base: tiny_hubert                       # path or known/bundled name
    pr_config: ctc_libriphone_embedded      # path or bundled config name
    sid_config: voxceleb1_embedded
    models:
      - {name: base, method: base, upstream: hubert_local}
      - {name: heads50_l1, method: head_pruning, rate: 0.5, recipe: tiny/heads50_l1}   # or a path
      - {name: mine, method: head_pruning, rate: 0.5, recipe: my_recipe.yaml}
      - {name: fbank, method: fbank, upstream: fbank}
      - {name: random, method: random_init}

Relative paths are relative to the plan's folder, after ``~`` and ``${VAR}`` are expanded; a name
that is no file there may be a bundled recipe or config (the rule: :mod:`upstream_compressed.bundled`).
``--corpus`` replaces ``corpus:`` and is relative to the current folder; recipes that read audio
name it ``${CORPUS}/...``, which the plan's corpus sets for every compression.

Real data sets instead of a make-corpus folder: ``data: {librispeech: DIR, lexicon: FILE, vocab: FILE,
voxceleb1: DIR, voxceleb1_split: iden_split.txt}`` (each overrides what ``corpus`` would give).

Seeds and SUPERB's learning-rate search (``--seeds``, ``--sid-lr-search``, ``--pr-lr-search`` replace them)::

    seeds: [0, 1, 2]                          # each downstream run once per seed (S3PRL's --seed)
    sid_lr_search: [0.1, 0.01, 0.001, 0.0001] # train each rate with the first seed, keep the best dev score
    pr_lr_search: [0.1, 0.01, 0.001, 0.0001]

The protocol (which runs, in which order, the chosen rate, the combined result):
:mod:`upstream_compressed.downstream_runs`.

Everything lands in EXPDIR in the layout ``upstream-compressed report`` reads::

    EXPDIR/models/<model>/model.json          what the model is (method, rate, upstream, ckpt)
    EXPDIR/models/<model>/delta.safetensors   for recipe models
    EXPDIR/models/<model>/profile.json        with profile_seconds (``--profile-seconds``)
    EXPDIR/downstream/<task>_<model>/         S3PRL's expdir; result.json once tested
    EXPDIR/downstream/<task>_<model>/runs/    with seeds or a search: one S3PRL expdir per run, combined
                                              in the folder's result.json (:mod:`.downstream_runs`)

Each stage skips work already done (a delta, a result.json), so a killed job resumes; downstream
runs go in parallel (``jobs``), each in its own process with one CPU thread unless told otherwise.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .bundled import bundled_config, bundled_plan, bundled_recipe, file_or_name, find_file, resolve_path
from .downstream_runs import (TASKS, PlanError, Run, Task, TaskRuns, _better, _combined_line, _run_line, check_rates,
                              check_seeds, task_folder, task_runs)
from .files import atomic_write_json, read_yaml
from .launch import SlurmOptions, make_launcher
from .overrides import ctc_override, voxceleb1_override

# Models without a recipe; any other method is a label (the report draws one line per label) on a recipe.
SPECIAL_METHODS = {"base", "fbank", "random_init", "checkpoint"}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    method: str
    rate: float | None = None
    upstream: str | None = None
    recipe: str | None = None
    ckpt: str | None = None
    downstream_lr: float | None = None  # replaces the downstream configs' learning rate for this model


@dataclass
class Plan:
    path: Path
    corpus: Path | None
    base: str
    configs: dict[str, Path]
    models: list[ModelSpec]
    data: dict[str, Path]  # DATA_KEYS -> paths the downstreams read
    override_base: bool = False  # compress every recipe on ``base`` instead of the recipe's own base
    seeds: list[int] | None = None  # S3PRL --seed of each downstream run; None: one run, S3PRL's default seed
    lr_search: dict[str, list[float]] = field(default_factory=dict)  # task key -> learning rates searched


PLAN_FIELDS = {"corpus", "base", "pr_config", "sid_config", "models", "data", "override_base", "seeds",
               "sid_lr_search", "pr_lr_search"}
# What the downstreams read; a make-corpus folder provides all of them, `data:` can name each (real data).
DATA_KEYS = ("librispeech", "lexicon", "vocab", "voxceleb1", "voxceleb1_split")
TASK_DATA = {"pr": ("librispeech", "lexicon", "vocab"), "sid": ("voxceleb1", "voxceleb1_split")}


def _corpus_data(corpus: Path) -> dict[str, Path]:
    return {"librispeech": corpus / "LibriSpeech", "lexicon": corpus / "lexicon.txt", "vocab": corpus / "phoneme.txt",
            "voxceleb1": corpus / "VoxCeleb1", "voxceleb1_split": corpus / "VoxCeleb1" / "iden_split.txt"}


def load_plan(path: str | os.PathLike, corpus: str | os.PathLike | None = None) -> Plan:
    """Read and check a plan: a file, or a bundled plan's name (``quick``, ``tiny``).

    ``corpus`` (a path from the current folder, as ``--corpus`` gives it) overrides the plan's
    ``corpus:``. Paths in the plan follow :mod:`upstream_compressed.bundled`'s rule: relative to the
    plan's folder after ``~`` and ``${VAR}``; ``recipe``, ``pr_config`` and ``sid_config`` may be
    bundled names (``tiny/kd``, ``ctc_libriphone_embedded``).
    """
    path = find_file(path, bundled_plan, PlanError)
    folder = path.resolve().parent
    data = read_yaml(path, PlanError, str(path)) or {}
    if not isinstance(data, dict):
        raise PlanError(f"{path}: expected a mapping with corpus, base, pr_config, sid_config and models")
    unknown = set(data) - PLAN_FIELDS
    if unknown:
        raise PlanError(f"{path}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
                        f"known: {', '.join(sorted(PLAN_FIELDS))}")
    if not isinstance(data.get("override_base", False), bool):
        raise PlanError(f"{path}: override_base must be true or false, not {data['override_base']!r}")
    if not isinstance(data.get("models") or [], list):
        raise PlanError(f"{path}: 'models' must be a list of model entries, not {data['models']!r}")
    given = {} if data.get("data") is None else data["data"]
    if not isinstance(given, dict) or set(given) - set(DATA_KEYS):
        raise PlanError(f"{path}: 'data' must map some of {', '.join(DATA_KEYS)} to paths")
    corpus_path = _corpus(path, folder, data.get("corpus"), corpus, complete_data=set(given) == set(DATA_KEYS))
    paths = _corpus_data(corpus_path) if corpus_path is not None else {}
    paths.update({k: resolve_path(v, folder, f"{path}: data.{k}", PlanError) for k, v in given.items()})
    configs = {}
    for key in TASKS:
        field = f"{key}_config"
        if field not in data:
            raise PlanError(f"{path}: missing '{field}' (the S3PRL downstream config for {TASKS[key].name})")
        configs[key] = resolve_path(data[field], folder, f"{path}: {field}", PlanError, bundled=bundled_config,
                                    must_be="file")
    models: list[ModelSpec] = []
    for index, entry in enumerate(data.get("models") or []):
        spec = _model(entry, index, path, folder)
        if spec.name in {m.name for m in models}:
            raise PlanError(f"{path}: models[{index}]: name {spec.name!r} must be unique")
        models.append(spec)
    if not models:
        raise PlanError(f"{path}: 'models' is empty")
    from .bases import KNOWN_BASES
    from .embedded import BUNDLED

    base = file_or_name(data.get("base", "tiny_hubert"), folder, f"{path}: base", PlanError,
                        {*KNOWN_BASES, *BUNDLED})
    seeds = None if data.get("seeds") is None else check_seeds(data["seeds"], f"{path}: seeds")
    lr_search = {key: check_rates(data[f"{key}_lr_search"], f"{path}: {key}_lr_search")
                 for key in TASKS if data.get(f"{key}_lr_search") is not None}
    return Plan(path, corpus_path, base, configs, models, paths, bool(data.get("override_base", False)), seeds,
                lr_search)


def _corpus(path: Path, folder: Path, value: Any, given: str | os.PathLike | None, complete_data: bool) -> Path | None:
    """The corpus folder: ``--corpus`` from the current folder, else the plan's ``corpus:`` by the path rule."""
    if given is not None:
        return Path(os.path.abspath(given))
    if value is None:
        if complete_data:
            return None
        raise PlanError(f"{path}: no 'corpus:' field, no --corpus, and 'data:' does not name all of {', '.join(DATA_KEYS)}")
    try:
        return resolve_path(value, folder, f"{path}: corpus", PlanError)
    except PlanError as error:
        raise PlanError(f"{error}: set it, or give --corpus DIR (a make-corpus folder)") from None


def _model(entry: Any, index: int, path: Path, folder: Path) -> ModelSpec:
    """One checked ``models:`` entry, its recipe and checkpoint paths resolved."""
    where = f"{path}: models[{index}]"
    if not isinstance(entry, dict) or "name" not in entry or "method" not in entry:
        raise PlanError(f"{where}: each model needs 'name' and 'method'")
    unknown = set(entry) - {f.name for f in ModelSpec.__dataclass_fields__.values()}
    if unknown:
        raise PlanError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    spec = ModelSpec(**entry)
    if not isinstance(spec.name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", spec.name):
        raise PlanError(f"{where}: name {spec.name!r} must be unique and use letters, digits, '_', '.', '-'")
    _check_model_types(spec, where)
    if spec.method in SPECIAL_METHODS and spec.recipe:
        raise PlanError(f"{where}: method {spec.method} takes no 'recipe'")
    if spec.method not in SPECIAL_METHODS:
        if not spec.recipe:
            raise PlanError(f"{where}: method {spec.method!r} needs 'recipe' (or use one of "
                            f"{', '.join(sorted(SPECIAL_METHODS))})")
        recipe = resolve_path(spec.recipe, folder, f"{where}.recipe", PlanError, bundled=bundled_recipe, must_be="file")
        spec = replace(spec, recipe=str(recipe))
    if spec.method == "checkpoint":
        if not (spec.ckpt and spec.upstream):
            raise PlanError(f"{where}: method checkpoint needs 'upstream' and 'ckpt'")
        spec = replace(spec, ckpt=str(resolve_path(spec.ckpt, folder, f"{where}.ckpt", PlanError, must_be="file")))
    return spec


def _check_model_types(spec: ModelSpec, where: str) -> None:
    """Each field of a models: entry has the type the stages use (text, or a finite number)."""
    for name in ("method", "upstream", "recipe", "ckpt"):
        value = getattr(spec, name)
        if (value is not None or name == "method") and not isinstance(value, str):
            raise PlanError(f"{where}.{name}: expected text, got {value!r}")
    if not spec.method.strip():
        raise PlanError(f"{where}.method: expected a method name, got {spec.method!r}")
    for name in ("rate", "downstream_lr"):
        value = getattr(spec, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if value is not None and (not number or value < 0 or (name == "downstream_lr" and value == 0)):
            raise PlanError(f"{where}.{name}: expected a {'positive' if name == 'downstream_lr' else 'non-negative'} "
                            f"number, got {value!r}")


# ----------------------------------------------------------------------------------- models
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "upstream_compressed.cli", *args]


def _run(command: list[str], log: Path, env: dict[str, str], append: bool = False) -> str:
    """Run a command with its output in ``log`` (after what it holds, if ``append``); raise with its tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a" if append else "w") as file:
        file.write("$ " + " ".join(command) + "\n")
        file.flush()
        # Run where we run: the plan's paths are absolute already, and EXPDIR is the caller's.
        result = subprocess.run(command, env=env, stdout=file, stderr=subprocess.STDOUT, text=True)
    output = log.read_text(errors="replace")
    if result.returncode != 0:
        raise RuntimeError(f"failed ({result.returncode}): {' '.join(command)}\nsee {log}; its end:\n{output[-2500:]}")
    return output


def prepare_model(spec: ModelSpec, plan: Plan, expdir: Path, env: dict[str, str]) -> dict[str, Any]:
    """Make the model's checkpoint/delta if needed and write models/<name>/model.json."""
    from .bases import resolve_base

    folder = expdir / "models" / spec.name
    info_file = folder / "model.json"
    if info_file.is_file():
        return json.loads(info_file.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"model": spec.name, "method": spec.method, "rate": spec.rate, "recipe": spec.recipe,
                            "downstream_lr": spec.downstream_lr}
    if spec.method == "base":
        base = resolve_base(plan.base)
        info.update(upstream=spec.upstream or _local_upstream(base), ckpt=str(base))
    elif spec.method == "fbank":
        info.update(upstream=spec.upstream or "fbank", ckpt=None)
    elif spec.method == "checkpoint":
        info.update(upstream=spec.upstream, ckpt=spec.ckpt)
    elif spec.method == "random_init":
        base = resolve_base(plan.base)
        target = folder / "random_init.pt"
        _random_like(base, target)
        info.update(upstream=spec.upstream or "hubert_local", ckpt=str(target))
    else:
        delta = folder / "delta.safetensors"
        if not delta.is_file():
            started = time.time()
            base = ["--base", plan.base] if plan.override_base else []
            _run(_cli("compress", spec.recipe, "-o", str(delta), "--work-dir", str(folder / "work"), *base),
                 folder / "compress.log", env)
            info["compress_seconds"] = round(time.time() - started, 1)
        info.update(upstream=spec.upstream or "compressed_local", ckpt=str(delta))
    atomic_write_json(info_file, info)
    return info


def _local_upstream(checkpoint: Path) -> str:
    """S3PRL's (or our) upstream that runs a base checkpoint as it is: hubert_local, wavlm_local, ..."""
    from .bases import LOCAL_UPSTREAM_OF_FORMAT
    from .model.convert import load_base

    return LOCAL_UPSTREAM_OF_FORMAT[load_base(checkpoint).source_format]


def _random_like(base: Path, target: Path) -> None:
    """The base's architecture with the random weights it started from (same shape and seed), if its recipe says."""
    from .embedded.pretrain import ModelShape, TrainOptions, pretrain, recipe_path

    recipe_file = recipe_path(base)
    if not recipe_file.is_file():
        raise PlanError(f"random_init needs the base's pretraining recipe {recipe_file} (shape and seed)")
    recipe = json.loads(recipe_file.read_text())
    options = {k: v for k, v in recipe["train_options"].items() if k in TrainOptions.__dataclass_fields__}
    pretrain(None, target, ModelShape(**recipe["model_shape"]), TrainOptions(**{**options, "device": "cpu"}),
             init_only=True, command=["upstream-compressed", "pretrain", "--init-only"], progress=False)


def profile_model(model: dict[str, Any], expdir: Path, env: dict[str, str], seconds: float, device: str,
                  repeats: int = 5) -> dict:
    """``upstream-compressed profile`` of one model into models/<name>/profile.json (kept once written)."""
    target = expdir / "models" / model["model"] / "profile.json"
    if target.is_file():
        return json.loads(target.read_text())
    command = _cli("profile", "-u", model["upstream"], "--seconds", str(seconds), "--device", device,
                   "--repeats", str(repeats), "--json")
    if model.get("ckpt"):
        command += ["-k", model["ckpt"]]
    output = _run(command, target.with_name("profile.log"), env)
    profile = json.loads(output.strip().splitlines()[-1])
    if profile.get("macs_effective") is None:  # a dense upstream profiled generically: every MAC is effective
        profile["macs_effective"] = profile["macs"]
    atomic_write_json(target, profile)
    return profile


def time_beside_base(prepared: dict[str, dict[str, Any]], expdir: Path, seconds: float, rounds: int,
                     threads: int) -> None:
    """Each profiled model's time ratio to the plan's base model, timed interleaved with it in this process
    (:mod:`upstream_compressed.relative_timing`), merged into its profile.json. Models timed in an earlier
    call are not timed again; a model added later is timed beside the base again, so every ratio is paired."""
    from .relative_timing import time_models_against_base

    base = next((name for name, m in prepared.items() if m.get("method") == "base"), None)
    files = {name: expdir / "models" / name / "profile.json" for name in prepared}
    todo = [n for n, f in files.items() if f.is_file() and "time_ratio_to_base" not in json.loads(f.read_text())]
    if base is None or not files[base].is_file() or not todo:
        return
    models = [prepared[name] for name in dict.fromkeys([base, *todo])]  # the base first, once
    for name, fields in time_models_against_base(models, base, seconds, rounds, threads=threads).items():
        atomic_write_json(files[name], {**json.loads(files[name].read_text()), **fields})


# ----------------------------------------------------------------------------------- downstream
def corpus_override(task: Task, data: dict[str, Path]) -> str:
    """S3PRL ``-o`` overrides that point a downstream config at the plan's data."""
    if task.downstream == "ctc":
        return ctc_override(data["librispeech"], data["lexicon"], data["vocab"])
    return voxceleb1_override(data["voxceleb1"], data["voxceleb1_split"])


def run_downstream(
    task: Task, model: dict[str, Any], plan: Plan, expdir: Path, device: str, env: dict[str, str], steps: int | None
) -> dict[str, Any]:
    """The single run of a (task, model) without seeds or a search: S3PRL's expdir is downstream/<task>_<model>/."""
    return train_and_test(task, model, plan, task_folder(expdir, task, model["model"]), device, env, steps,
                          lr=model.get("downstream_lr"))


def train_and_test(
    task: Task, model: dict[str, Any], plan: Plan, folder: Path, device: str, env: dict[str, str],
    steps: int | None = None, lr: float | None = None, seed: int | None = None,
) -> dict[str, Any]:
    """Train the downstream in S3PRL expdir ``folder``, evaluate its dev-best checkpoint on test; folder/result.json.

    ``lr`` replaces the config's learning rate and ``seed`` is S3PRL's ``--seed`` (None: the config's
    rate, S3PRL's default seed). A run killed after S3PRL saved a ``states-<step>.ckpt`` continues from
    there (S3PRL's ``-a`` resume; its data order after the resume differs from an uninterrupted run's);
    one killed after its training only runs the test.
    """
    result_file = folder / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    saved_step = _last_saved_step(folder)
    if folder.exists() and saved_step is None:  # killed before its first checkpoint: start it again
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(plan.configs[task.key].read_text())
    override = corpus_override(task, plan.data)
    if steps:  # fewer steps: evaluate and save within them, so a dev-best checkpoint exists
        runner_cfg = config["runner"]
        runner_cfg.update(total_steps=steps, eval_step=min(runner_cfg["eval_step"], steps),
                          save_step=min(runner_cfg["save_step"], steps))
        override += "".join(f",,config.runner.{k}={runner_cfg[k]}" for k in ("total_steps", "eval_step", "save_step"))
    if lr:
        config["optimizer"]["lr"] = lr
        override += f",,config.optimizer.lr={lr}"
    upstream = ["-u", model["upstream"]] + (["-k", model["ckpt"]] if model.get("ckpt") else [])
    # S3PRL writes voxceleb1's file-list cache non-atomically: one cache per run, so parallel runs never race.
    env = {**env, "UPSTREAM_COMPRESSED_VOXCELEB1_CACHE": str(folder / "voxceleb1_cache")}
    runner = [sys.executable, "-m", "upstream_compressed.run_downstream", "--device", device]
    started = time.time()
    train = [*runner, "-m", "train", *upstream, "-d", task.downstream, "-c", str(plan.configs[task.key]),
             "-p", str(folder), "-o", override, *([] if seed is None else ["--seed", str(seed)])]
    if saved_step is None:
        _run(train, folder / "train.log", env)
    elif saved_step < config["runner"]["total_steps"] or not (folder / "dev-best.ckpt").is_file():
        # A killed run: S3PRL's own resume (-a) continues from its last states-<step>.ckpt.
        _run([*train, "-a"], folder / "train.log", env, append=True)
    trained = time.time() - started
    best = folder / "dev-best.ckpt"
    if not best.is_file():
        raise RuntimeError(f"{folder}: training wrote no dev-best.ckpt (is eval_step larger than total_steps?)")
    output = _run([*runner, "-m", "evaluate", "-e", str(best)], folder / "evaluate.log", env)
    found = re.findall(rf"test {task.metric}: ([0-9.eE+-]+)", output)
    if not found:
        raise RuntimeError(f"no 'test {task.metric}' in {folder / 'evaluate.log'}")
    dev = [float(v) for v in re.findall(rf"dev {task.metric}: ([0-9.eE+-]+)", (folder / "train.log").read_text(errors="replace"))]
    better = _better(task)
    result = {
        "task": task.name,
        "model": model["model"],
        "metric": task.metric,
        "test": float(found[-1]),
        "dev_best": better(dev) if dev else None,
        "dev_history": dev,
        "lr": config["optimizer"]["lr"],
        "steps": config["runner"]["total_steps"],
        "train_seconds": round(trained, 1),
        "device": device,
        **({} if seed is None else {"seed": seed}),
    }
    if saved_step is not None:  # train_seconds then counts only this call's part
        result["resumed_from_step"] = saved_step
    for state in folder.glob("states-*.ckpt"):  # dev-best.ckpt stays for evaluation and submission
        state.unlink()
    atomic_write_json(result_file, result)
    return result


def _last_saved_step(folder: Path) -> int | None:
    """The step of the newest ``states-<step>.ckpt`` S3PRL saved in ``folder``, if any."""
    steps = [int(m.group(1)) for p in folder.glob("states-*.ckpt") if (m := re.fullmatch(r"states-(\d+)\.ckpt", p.name))]
    return max(steps, default=None)


def run_plan(
    plan: Plan,
    expdir: Path,
    tasks: list[str],
    *,
    jobs: int = 1,
    device: str = "cpu",
    threads: int = 1,
    models: list[str] | None = None,
    steps: dict[str, int | None] | None = None,
    progress: bool = True,
    profile_seconds: float | None = None,
    profile_repeats: int = 5,
    launcher: str = "local",
    slurm: SlurmOptions | None = None,
) -> list[dict[str, Any]]:
    """Prepare every model and run its downstream tasks; ``jobs`` processes at a time, or each as a
    Slurm job (``launcher``: :mod:`upstream_compressed.launch`)."""
    from tqdm import tqdm

    missing = [f"{k} {plan.data[k]}" for t in tasks for k in TASK_DATA[t] if not plan.data[k].exists()]
    if missing:
        hint = f"; make the corpus with `upstream-compressed make-corpus {plan.corpus}`" if plan.corpus else ""
        raise PlanError(f"{plan.path}: not found: {', '.join(missing)}{hint}")
    overrides = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        **({"CORPUS": str(plan.corpus)} if plan.corpus else {}),  # recipes may name audio as ${CORPUS}/...
    }
    env = {**os.environ, **overrides}
    runs, here = make_launcher(launcher, overrides, expdir, slurm), make_launcher("local", overrides, expdir)
    selected = [m for m in plan.models if models is None or m.name in models]
    if models is not None and len(selected) != len(set(models)):
        known = ", ".join(m.name for m in plan.models)
        raise PlanError(f"--models names {sorted(set(models) - {m.name for m in selected})} not in the plan ({known})")
    # What each (task, model) will cost, before any work: a model's downstream_lr comes from its spec here.
    costs = {m.name: [task_runs(TASKS[t], {"model": m.name, "downstream_lr": m.downstream_lr}, plan, expdir)
                      for t in tasks] for m in selected}
    for work in (w for works in costs.values() for w in works):
        work.refuse_mixed_layout()
    # In-process models (base, fbank, random weights) first; compressions run as subprocesses, and each
    # model's downstream runs start as soon as it is ready (one pool of ``jobs`` workers for both; each
    # run of a search or of a seed is its own job).
    prepared = {m.name: prepare_model(m, plan, expdir, env) for m in selected if m.method in SPECIAL_METHODS}
    results: dict[str, Any] = {}
    failures: list[str] = []
    bar = tqdm(total=len(selected) - len(prepared) + sum(w.total for works in costs.values() for w in works),
               desc="runs", unit="run", disable=not progress)
    with ThreadPoolExecutor(max_workers=runs.concurrent(jobs)) as pool:
        pending: dict[Future, tuple[str, str] | tuple[TaskRuns, Run]] = {}

        def dispatch(name: str, done: Path, function: Any, *args: Any, **kwargs: Any) -> Future:
            chosen = here if done.is_file() else runs  # kept work is read here, never queued on a cluster
            return pool.submit(chosen.call, name, function, *args, **kwargs)

        def failed(work: TaskRuns, label: str, error: Exception) -> None:
            work.failed = True
            failures.append(f"downstream {label}: {error}")
            bar.write(f"FAILED downstream {label}: {str(error)[:800]}")

        def advance(work: TaskRuns) -> None:
            """Dispatch the runs ``work`` can start now; once all are in, its result."""
            try:
                started = work.next_runs()
                for run in started:
                    name = work.folder.name if work.seeds is None else f"{work.folder.name}_{run.folder.name}"
                    future = dispatch(name, run.folder / "result.json", train_and_test, work.task, work.model, plan,
                                      run.folder, device, steps=(steps or {}).get(work.task.key), lr=run.lr,
                                      seed=run.seed)
                    pending[future] = (work, run)
                    work.pending += 1
                if not started and work.complete:
                    results[work.folder.name] = value = work.result()
                    if work.seeds is not None:
                        bar.write(_combined_line(value))
            except Exception as error:  # choosing a rate or writing the result: this (task, model) only
                failed(work, work.folder.name, error)

        def submit_downstream(model: dict[str, Any]) -> None:
            for t in tasks:
                work = task_runs(TASKS[t], model, plan, expdir)
                try:
                    kept_result = work.kept()
                    if kept_result is None and (note := work.discard_stale()):
                        bar.write(note)
                except Exception as error:  # an unreadable result.json: this (task, model) only
                    failed(work, work.folder.name, error)
                    bar.update(work.total)
                    continue
                if kept_result is None:
                    advance(work)
                    continue
                results[work.folder.name] = kept_result
                bar.write(_combined_line(kept_result) if work.seeds is not None else
                          _run_line(work, work.first_runs()[0], kept_result))
                bar.update(work.total)

        def finished_run(work: TaskRuns, run: Run, future: Future) -> None:
            work.pending -= 1
            try:
                value = future.result()
            except Exception as error:  # one broken run must not lose the others
                failed(work, work.folder.name + ("" if work.seeds is None else f" {run.folder.name}"), error)
            else:
                work.results[run.folder] = value
                bar.write(_run_line(work, run, value))
                advance(work)
            if work.failed and work.pending == 0 and work.rates and work.chosen is None and work.seeds:
                bar.update(len(work.seeds) - 1)  # the chosen rate's other seeds will not run

        for model in prepared.values():
            submit_downstream(model)
        kept = {m.name for m in selected if (expdir / "models" / m.name / "model.json").is_file()}
        for spec in selected:
            if spec.method not in SPECIAL_METHODS:
                done = expdir / "models" / spec.name / "model.json"
                pending[dispatch(f"compress_{spec.name}", done, prepare_model, spec, plan, expdir)] = \
                    ("compress", spec.name)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                entry = pending.pop(future)
                if isinstance(entry[0], TaskRuns):
                    finished_run(*entry, future)
                    bar.update()
                    continue
                what, name = entry
                try:
                    value = future.result()
                except Exception as error:  # one broken compression must not lose the other models
                    failures.append(f"{what} {name}: {error}")
                    bar.write(f"FAILED {what} {name}: {str(error)[:800]}")
                    bar.update(sum(w.total for w in costs[name]))  # its downstream runs will not happen
                else:
                    prepared[name] = value
                    submit_downstream(value)
                    if name not in kept:  # a delta made in an earlier call is not news
                        bar.write(f"done compress {name}")
                bar.update()
    bar.close()
    if profile_seconds:  # one at a time, after the training, so that the timings are not disturbed
        for name, model in tqdm(prepared.items(), desc="profile", unit="model", disable=not progress):
            try:
                profile_model(model, expdir, {**env, "OMP_NUM_THREADS": str(threads)}, profile_seconds, "cpu",
                              profile_repeats)
            except Exception as error:
                failures.append(f"profile {name}: {error}")
        try:
            time_beside_base(prepared, expdir, profile_seconds, max(profile_repeats, 5), threads)
        except Exception as error:
            failures.append(f"time beside the base: {error}")
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed (the others are done and kept):\n" + "\n".join(failures))
    return list(results.values())
