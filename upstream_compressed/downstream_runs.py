"""Seeds and SUPERB's learning-rate search: the runs of one (task, model) and their combined result.

A plan's ``seeds`` (``--seeds``) runs each downstream once per seed (S3PRL's ``--seed``); its
``sid_lr_search`` / ``pr_lr_search`` (``--sid-lr-search``, ``--pr-lr-search``) search that task's
learning rate. A searched (task, model) trains every rate with the first seed, chooses the rate with
the best dev score (min dev PER, max dev accuracy; a tie goes to the rate listed first), then runs the
other seeds at that rate only: n_rates + n_seeds - 1 runs. A model with ``downstream_lr`` is not
searched. A search without ``seeds`` uses S3PRL's default seed (1337). Without both, one run as before.

Each run is one S3PRL training + test (:func:`upstream_compressed.experiments.train_and_test`), each
its own job, in EXPDIR/downstream/::

    <task>_<model>/                            without seeds or a search: the one run's S3PRL expdir,
                                               result.json once tested (the layout before seeds existed)
    <task>_<model>/runs/lr<rate>-seed<seed>/   with seeds or a search: one S3PRL expdir (and result.json)
                                               per run, the rate spelled as :func:`rate_text` spells it
    <task>_<model>/result.json                 then combines the chosen rate's seeds: the mean test
                                               score, ``seeds``, ``runs`` and, searched, ``lr_search``

:class:`PlanError`, :class:`Task` and ``TASKS`` are defined here, so that this module imports nothing
from :mod:`upstream_compressed.experiments` (but the type ``Plan``), which imports it and re-exports them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from .files import atomic_write_json

if TYPE_CHECKING:
    from .experiments import Plan


# ----------------------------------------------------------------------------------- tasks
class PlanError(ValueError):
    """A plan that cannot run; the message names the field."""


@dataclass(frozen=True)
class Task:
    key: str  # pr | sid
    name: str  # PR | SID
    downstream: str
    metric: str  # as S3PRL's evaluate prints it: "test <metric>: <value>"


TASKS = {
    "pr": Task("pr", "PR", "ctc", "per"),
    "sid": Task("sid", "SID", "voxceleb1", "acc"),
}


def task_folder(expdir: Path, task: Task, model_name: str) -> Path:
    return expdir / "downstream" / f"{task.key}_{model_name}"


def _better(task: Task) -> Callable[..., Any]:
    """``min`` for PER, ``max`` for accuracy: both return the first of equal values (ties go to the first)."""
    return min if task.metric == "per" else max


# ----------------------------------------------------------------------------------- seeds and rates
# S3PRL's run_downstream --seed default: the seed of a search given without seeds.
S3PRL_DEFAULT_SEED = 1337


def check_seeds(values: Any, where: str) -> list[int]:
    """A non-empty list of distinct seeds numpy accepts (S3PRL seeds numpy with it); the error names ``where``."""
    if not isinstance(values, list) or not values:
        raise PlanError(f"{where}: expected a non-empty list of seeds, got {values!r}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
            raise PlanError(f"{where}: seed {value!r} must be an integer from 0 to 2**32 - 1")
    _refuse_repeats(values, where, "seed")
    return list(values)


def check_rates(values: Any, where: str) -> list[float]:
    """A non-empty list of distinct positive finite learning rates; the error names ``where``."""
    if not isinstance(values, list) or not values:
        raise PlanError(f"{where}: expected a non-empty list of learning rates, got {values!r}")
    for value in values:
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value <= 0:
            raise PlanError(f"{where}: learning rate {value!r} must be a positive number")
    rates = [float(v) for v in values]
    _refuse_repeats(rates, where, "learning rate")
    return rates


def _refuse_repeats(values: list, where: str, what: str) -> None:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise PlanError(f"{where}: {what}(s) {', '.join(map(str, repeated))} given more than once; each is one run")


def seeds_from_text(text: str, flag: str) -> list[int]:
    """``--seeds 0,1,2`` as a checked list; the error names ``flag``."""
    return check_seeds([_number(item, int, flag, "an integer") for item in _items(text, flag)], flag)


def rates_from_text(text: str, flag: str) -> list[float]:
    """``--sid-lr-search 1e-2,1e-3`` as a checked list; the error names ``flag``."""
    return check_rates([_number(item, float, flag, "a number") for item in _items(text, flag)], flag)


def _items(text: str, flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not any(items) or not all(items):
        raise PlanError(f"{flag} {text!r}: give a comma-separated list, e.g. {flag} "
                        f"{'0,1,2' if flag.endswith('seeds') else '1e-2,1e-3'}")
    return items


def _number(item: str, kind: type, flag: str, what: str) -> Any:
    try:
        return kind(item)
    except ValueError:
        raise PlanError(f"{flag}: {item!r} is not {what}") from None


# ----------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    """One S3PRL training + test: its expdir, learning rate (None: the config's) and seed (None: S3PRL's default)."""

    folder: Path
    lr: float | None
    seed: int | None

    @property
    def done(self) -> bool:
        return (self.folder / "result.json").is_file()


def rate_text(rate: float) -> str:
    """A learning rate as run folders and ``lr_search`` keys spell it: Python's shortest exact form (0.01, 1e-05)."""
    return repr(float(rate))


def run_name(lr: float, seed: int) -> str:
    return f"lr{rate_text(lr)}-seed{seed}"


@dataclass
class TaskRuns:
    """The runs of one (task, model), in the order SUPERB does them (the module's docstring), and their result.

    ``seeds`` None: the single run, S3PRL's expdir the task folder itself. Otherwise each run is its own
    expdir ``runs/lr<rate>-seed<seed>/``; without a search, every seed runs at the fixed rate ``lr``.
    """

    task: Task
    model: dict[str, Any]
    folder: Path
    seeds: list[int] | None
    rates: list[float] | None  # searched; None: the fixed rate ``lr``
    lr: float | None  # the fixed rate: the model's downstream_lr, else (with seeds) the config's
    results: dict[Path, dict[str, Any]] = field(default_factory=dict)  # finished runs by folder
    chosen: float | None = None  # the searched rate chosen, once the search is in
    pending: int = 0  # runs dispatched and not finished
    started: bool = False
    failed: bool = False

    def run(self, lr: float, seed: int) -> Run:
        return Run(self.folder / "runs" / run_name(lr, seed), lr, seed)

    def first_runs(self) -> list[Run]:
        if self.seeds is None:
            return [Run(self.folder, self.lr, None)]
        if self.rates:
            return [self.run(rate, self.seeds[0]) for rate in self.rates]
        return [self.run(self.lr, seed) for seed in self.seeds]

    def run_paths(self, lr: float) -> list[str]:
        """The runs of rate ``lr``, one per seed, as the combined result.json lists them."""
        return [f"runs/{run_name(lr, seed)}" for seed in self.seeds]

    def later_runs(self, lr: float) -> list[Run]:
        """After a search: the chosen rate's other seeds."""
        return [self.run(lr, seed) for seed in self.seeds[1:]] if self.rates and self.seeds else []

    @property
    def total(self) -> int:
        """The runs this costs: n_rates + n_seeds - 1 with a search, n_seeds without, 1 for the single run."""
        return len(self.first_runs()) + (len(self.seeds) - 1 if self.rates and self.seeds else 0)

    def next_runs(self) -> list[Run]:
        """The runs to start now: the first stage at once; once it is all in, the chosen rate's other seeds."""
        if not self.started:
            self.started = True
            return self.first_runs()
        if self.rates and self.chosen is None and self.pending == 0 and not self.failed:
            self.chosen = self.choose()
            return self.later_runs(self.chosen)
        return []

    @property
    def complete(self) -> bool:
        return self.started and self.pending == 0 and not self.failed and (not self.rates or self.chosen is not None)

    def dev_scores(self) -> dict[float, float | None]:
        """Each searched rate's best dev score (the checkpoint S3PRL keeps and tests), with the first seed."""
        assert self.rates and self.seeds
        return {rate: self.results[self.run(rate, self.seeds[0]).folder]["dev_best"] for rate in self.rates}

    def choose(self) -> float:
        """The searched rate with the best dev score (min PER, max accuracy); a tie goes to the rate listed first."""
        scored = {rate: dev for rate, dev in self.dev_scores().items() if dev is not None}
        if not scored:
            raise RuntimeError(f"{self.folder}: no searched run printed a dev {self.task.metric}; no rate to choose")
        return _better(self.task)(scored, key=scored.__getitem__)

    def result(self) -> dict[str, Any]:
        """The single run's result, or the combined one written to the task folder's result.json."""
        if self.seeds is None:
            return self.results[self.folder]
        lr = self.chosen if self.rates else self.lr
        assert lr is not None
        chosen = [self.results[self.run(lr, seed).folder] for seed in self.seeds]
        devs = [r["dev_best"] for r in chosen]
        combined = {
            "task": self.task.name,
            "model": self.model["model"],
            "metric": self.task.metric,
            # The mean over seeds; for PER, every seed scored the same test utterances, so it is also the
            # pooled errors / pooled reference length.
            "test": sum(r["test"] for r in chosen) / len(chosen),
            "dev_best": None if None in devs else sum(devs) / len(devs),
            "dev_history": [r["dev_history"] for r in chosen],  # one list per seed
            "lr": lr,
            "steps": chosen[0]["steps"],
            "train_seconds": round(sum(r["train_seconds"] for r in self.results.values()), 1),  # the search's too
            "device": chosen[0]["device"],
            "seeds": self.seeds,
            "runs": self.run_paths(lr),
        }
        if self.rates:
            combined["lr_search"] = {rate_text(rate): dev for rate, dev in self.dev_scores().items()}
        atomic_write_json(self.folder / "result.json", combined)
        return combined

    def kept(self) -> dict[str, Any] | None:
        """The task folder's result.json if it answers what is asked now, else None (it is then redone).

        The single run's is kept as it always was; a combined one only if it records these seeds and
        this search, and every run it came from still has its result.json.
        """
        file = self.folder / "result.json"
        if not file.is_file():
            return None
        result = json.loads(file.read_text())
        if self.seeds is None:
            return result
        lr = result.get("lr")
        asked = (result.get("seeds") == self.seeds
                 and ("lr_search" in result) == bool(self.rates)
                 and list(result.get("lr_search") or {}) == [rate_text(rate) for rate in self.rates or []]
                 and (lr in self.rates if self.rates else lr == self.lr)
                 and result.get("runs") == self.run_paths(lr))
        if asked and all(run.done for run in self.first_runs() + self.later_runs(lr)):
            return result
        return None

    def discard_stale(self) -> str | None:
        """A task folder result.json that is not kept: a combined one goes before its runs are redone (so no
        report reads it meanwhile), a single run's is replaced at the end; says so, or None if there is none."""
        file = self.folder / "result.json"
        if self.seeds is None or not file.is_file():
            return None
        old = json.loads(file.read_text())
        if "runs" in old:
            file.unlink()
        return (f"{self.folder.name}: its result.json (seeds {old.get('seeds') or 'none'}, searched "
                f"{list(old.get('lr_search') or []) or 'no rate'}) is not what is asked now (seeds {self.seeds}, "
                f"searched {[rate_text(r) for r in self.rates or []] or 'no rate'}) or lost a run: redone from runs/")

    def refuse_mixed_layout(self) -> None:
        """The single run's expdir is the task folder, which it removes to restart: never over seeds' runs."""
        if self.seeds is None and (self.folder / "runs").is_dir():
            raise PlanError(f"{self.folder} holds runs of seeds or a learning-rate search (runs/): give the same "
                            "--seeds / --sid-lr-search / --pr-lr-search (or plan fields) again, or remove the folder "
                            "to run it once without them")


def task_runs(task: Task, model: dict[str, Any], plan: Plan, expdir: Path) -> TaskRuns:
    """The runs the plan asks of ``model`` on ``task``: a model with its own downstream_lr is not searched."""
    fixed = model.get("downstream_lr")
    rates = None if fixed else plan.lr_search.get(task.key)
    seeds = plan.seeds or ([S3PRL_DEFAULT_SEED] if rates else None)
    lr = fixed if seeds is None or rates else (fixed or _config_lr(plan, task))
    return TaskRuns(task, model, task_folder(expdir, task, model["model"]), seeds, rates, lr)


def _config_lr(plan: Plan, task: Task) -> float:
    return float(yaml.safe_load(plan.configs[task.key].read_text())["optimizer"]["lr"])


def _done(value: dict[str, Any], where: str = "") -> str:
    return f"done {value['task']} {value['model']}{where}: test {value['metric']} {value['test']:.4f}"


def _run_line(work: TaskRuns, run: Run, value: dict[str, Any]) -> str:
    """One run's progress line; with seeds or a search it names the run and its dev score."""
    where = "" if work.seeds is None else f" {run.folder.name}"
    dev = "" if work.seeds is None or value["dev_best"] is None else f"dev {value['dev_best']:.4f}, "
    return f"{_done(value, where)} ({dev}{value['train_seconds']:.0f} s)"


def _combined_line(value: dict[str, Any]) -> str:
    """A combined result's progress line."""
    searched = f", chosen by dev {value['metric']}" if "lr_search" in value else ""
    return f"{_done(value)}, mean of {len(value['seeds'])} seed(s) at lr {value['lr']:g}{searched}"

