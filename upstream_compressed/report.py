"""The trade-off report of an experiment folder: one table (markdown, CSV, JSON) and PNG plots.

Input: an experiment folder EXPDIR, as the pipeline (``run_downstream.sh``) fills it::

    EXPDIR/models/<model>/model.json
        {"model": str,            # equal to the folder name
         "method": str,           # "base", "head_pruning", "row_pruning", "low_rank", "weight_pruning",
                                  # "distillation", "kd_head_lr", ...
         "rate": float | null,    # fraction removed; null for the base
         "upstream": str, "ckpt": str | null, "recipe": str | null}
    EXPDIR/models/<model>/profile.json
        {"params": int, "params_encoder": int, "macs": int, "macs_effective": int,
         "seconds_audio": float, "median_seconds": float, "rtf": float, "device": str, ...}
    EXPDIR/downstream/<task>_<model>/result.json   (task in lower case: pr_base, sid_base)
        {"task": "PR" | "SID", "model": str, "metric": "per" | "acc",
         "test": float,           # a fraction (0.0541), not a percentage
         "dev_best": float | null, "lr": float, "steps": int, "train_seconds": float,
         # with seeds or a learning-rate search (``experiment --seeds``, ``--sid-lr-search``):
         "seeds": [int], "runs": ["runs/lr<rate>-seed<seed>", ...],  # the chosen rate's runs, one per seed
         "lr_search": {"<rate>": dev score}}                       # searched rates; lr is the chosen one
    EXPDIR/downstream/<task>_<model>/runs/<run>/result.json   each run's own (test, lr, seed, ...)

Every model folder with a model.json gives one row; a missing profile.json or result.json only
leaves its cells empty ('-'), so the report can be made while the pipeline is still running.

Beside each result.json (with seeds: in each run folder it lists), S3PRL's evaluation left its
per-utterance output (PR: ``test-hyp.ark`` and ``test-ref.ark``; SID: ``test_predict.txt`` and
``test_truth.txt``). From them each task entry of a row
(``rows[i]["PR"]``, ``rows[i]["SID"]``) gets, as fractions like ``test`` (see
:mod:`upstream_compressed.statistics` for the bootstrap):

- ``test_runs``: one score per run (seed): the runs result.json lists (``runs``), else the folder itself;
- ``test_mean``: their mean; ``test_ci95``: ``[low, high]``, the 95% two-level bootstrap interval
  (seeds, then utterances);
- ``vs_base``: ``{"diff", "ci95", "p"}``, this model minus the base model (the row with method
  ``base``) by a paired bootstrap over the same utterances and seeds; null on the base row itself;
- ``stats_note``: null, or why some of these are null (per-utterance files missing or disagreeing
  with result.json, utterance ids differing from the base's, no single base model).

Missing per-utterance files never fail the report: those fields are null and ``stats_note`` says why.
report.md then shows ``mean ± half-width`` of the interval and marks with ``*`` a difference from the
base whose interval excludes 0; the plots draw the intervals as error bars. ``report.json`` also gets
``"statistics"``: the bootstrap's description, resamples, seed and level.

Output, in OUTDIR (default EXPDIR): ``report.md`` (the table, its notes and the plots),
``report.csv`` (the same cells, scores as plain numbers with their 95% intervals' ends in columns of their own; missing ones empty), ``per_vs_macs.png``, ``acc_vs_macs.png``,
``per_vs_seconds.png``; and ``EXPDIR/report.json``: ``{"seconds_audio": float | null, "rows": [...]}``,
each row the model.json fields plus ``"profile"``, ``"PR"`` and ``"SID"`` (the files' contents or null).

Plots draw one line per method (the trade-off curve over its rates) and the uncompressed base as a
star; their x axis is effective MACs (only multiplications by non-zero weights; equal to the dense
MACs for models without weight sparsity) or median wall-clock time.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import statistics
from .delta import atomic_write_bytes

if TYPE_CHECKING:  # matplotlib is imported only when plotting, so other commands do not pay for it
    from matplotlib.figure import Figure

TASKS = {"PR": "per", "SID": "acc"}
PLOTS = ("per_vs_macs", "acc_vs_macs", "per_vs_seconds")
MISSING = "-"
_MODEL_KEYS = {"model": str, "method": str}
_PROFILE_KEYS = {"params": int, "macs": int, "macs_effective": int, "seconds_audio": (int, float),
                 "median_seconds": (int, float), "rtf": (int, float), "device": str}
_RESULT_KEYS = {"task": str, "model": str, "metric": str, "test": (int, float), "lr": (int, float)}


class ReportError(ValueError):
    """An experiment folder the report cannot read; the message names the file and the fix."""


@dataclass
class Report:
    """The merged rows (sorted as in the table) and what was skipped on the way."""

    rows: list[dict[str, Any]]
    seconds_audio: float | None
    warnings: list[str] = field(default_factory=list)
    resamples: int = statistics.RESAMPLES
    seed: int = statistics.SEED


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")  # Python reads NaN/Infinity; no table or plot can use them


def _read_json(path: Path, required: dict[str, Any]) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(), parse_constant=_no_constant)
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ReportError(f"{path}: not readable JSON ({error}); rewrite it or remove it") from error
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for key, kind in required.items():
        value = data.get(key)
        # bool is an int to Python but never a valid count or score here
        if value is None or isinstance(value, bool) or not isinstance(value, kind):
            kind_name = getattr(kind, "__name__", "number")
            raise ReportError(f"{path}: field {key!r} is {value!r}; it must be present and a {kind_name} "
                              "(see upstream_compressed/report.py for the layout)")
    return data


def _read_model(folder: Path) -> dict[str, Any]:
    path = folder / "model.json"
    info = _read_json(path, _MODEL_KEYS)
    if info["model"] != folder.name:
        raise ReportError(f"{path}: model {info['model']!r} differs from its folder name {folder.name!r}; "
                          "the folder must be named after the model")
    rate = info.get("rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1):
        raise ReportError(f"{path}: rate {rate!r} must be null or a fraction removed in [0, 1]")
    return {"model": info["model"], "method": info["method"], "rate": rate, "upstream": info.get("upstream"),
            "ckpt": info.get("ckpt"), "recipe": info.get("recipe")}


def _read_profile(path: Path) -> dict[str, Any]:
    profile = _read_json(path, _PROFILE_KEYS)
    if profile.get("time_ratio_to_base") is not None:  # optional: written when timed beside the base
        _read_json(path, {"time_ratio_to_base": (int, float)})
        quartiles = profile.get("time_ratio_iqr")
        if (not isinstance(quartiles, list) or len(quartiles) != 2
                or not all(isinstance(q, (int, float)) and not isinstance(q, bool) for q in quartiles)):
            raise ReportError(f"{path}: time_ratio_iqr is {quartiles!r}; with time_ratio_to_base it must be "
                              "[q25, q75], two numbers (see upstream_compressed/relative_timing.py)")
    return profile


def _read_result(folder: Path) -> dict[str, Any]:
    path = folder / "result.json"
    result = _read_json(path, _RESULT_KEYS)
    task, metric, test = result["task"], result["metric"], result["test"]
    if TASKS.get(task) != metric:
        raise ReportError(f"{path}: task {task!r} with metric {metric!r}; expected one of "
                          + ", ".join(f"{t} with {m}" for t, m in TASKS.items()))
    if folder.name != f"{task.lower()}_{result['model']}":
        raise ReportError(f"{path}: folder name {folder.name!r} should be {task.lower()}_{result['model']} (<task>_<model>, task in lower case)")
    if not 0 <= test <= 1:
        raise ReportError(f"{path}: test {test!r} is outside [0, 1]; result.json holds fractions "
                          "(0.0541 for 5.41%), not percentages")
    return result


def _run_folders(folder: Path, result: dict[str, Any]) -> list[Path]:
    """The S3PRL expdirs of one model and task, one per run (seed): those result.json lists in ``runs``
    (seeds or a learning-rate search), else the result's own folder."""
    runs = result.get("runs")
    if runs is None:
        return [folder]
    if not isinstance(runs, list) or not runs or not all(isinstance(r, str) and r for r in runs):
        raise ReportError(f"{folder / 'result.json'}: runs {runs!r} must be a non-empty list of run folders")
    missing = [r for r in runs if not (folder / r).is_dir()]
    if missing:
        raise ReportError(f"{folder / 'result.json'}: its run folder(s) {', '.join(missing)} are missing; run "
                          "`upstream-compressed experiment` again with the same seeds and search to redo them")
    return [folder / r for r in runs]


# result.json's test is S3PRL's printed value: PER exactly the per-utterance aggregate, accuracy a float32 mean
_AGREE = 1e-6


def _run_test(folder: Path, run_folder: Path, result: dict[str, Any]) -> float:
    """The test score a run's own result.json holds (the folder's, for a single run)."""
    if run_folder == folder:
        return result["test"]
    if not (run_folder / "result.json").is_file():
        raise statistics.StatisticsError(f"{run_folder}: no result.json (is the run being redone?)")
    return _read_json(run_folder / "result.json", {"test": (int, float)})["test"]


def _task_runs(folder: Path, result: dict[str, Any]) -> statistics.Runs:
    """The per-utterance scores of a result's runs, each checked against the test score its result.json holds."""
    task = result["task"]
    runs, tests = [], []
    for run_folder in _run_folders(folder, result):
        run, test = statistics.read_run(run_folder, task), _run_test(folder, run_folder, result)
        if abs(run.score - test) > _AGREE:
            output, reference = statistics.FILES[task]
            raise statistics.StatisticsError(
                f"{run_folder}: {output} and {reference} give test {result['metric']} {run.score!r}, but result.json "
                f"holds {test!r}: they come from different evaluations; evaluate it again")
        runs.append(run)
        tests.append(test)
    if abs(sum(tests) / len(tests) - result["test"]) > _AGREE:
        raise statistics.StatisticsError(f"{folder / 'result.json'}: test {result['test']!r} is not the mean of its "
                                         f"runs' {tests!r}; run `upstream-compressed experiment` again to rewrite it")
    return statistics.Runs.of(runs)


def _add_statistics(rows: dict[str, dict[str, Any]], folders: dict[tuple[str, str], Path], resamples: int,
                    seed: int) -> None:
    """Per task: each result's test_runs / test_mean / test_ci95 / vs_base / stats_note, in place."""
    for task in TASKS:
        systems: dict[str, statistics.Runs] = {}
        for name, row in rows.items():
            if row[task] is None:
                continue
            row[task].update(statistics.empty_fields())
            try:
                systems[name] = _task_runs(folders[task, name], row[task])
            except statistics.StatisticsError as error:
                row[task]["stats_note"] = f"no per-utterance scores: {error}"
        bases = sorted(name for name, row in rows.items() if row["method"] == "base" and row[task] is not None)
        base = bases[0] if len(bases) == 1 and bases[0] in systems else None
        for name, fields in statistics.task_statistics(systems, base, resamples=resamples, seed=seed).items():
            rows[name][task].update(fields)
        if base is None:
            if not bases:
                why = f"no base model (method base) has a {task} result"
            elif len(bases) > 1:
                why = f"several base models ({', '.join(bases)}); which one a model compresses is not recorded"
            else:
                why = f"the base {bases[0]} has no per-utterance scores"
            for name in systems:
                if rows[name]["method"] != "base":
                    rows[name][task]["stats_note"] = f"no vs_base: {why}"


def load_report(expdir: str | Path, resamples: int = statistics.RESAMPLES, seed: int = statistics.SEED) -> Report:
    """Read every model's model.json, profile.json and downstream results under ``expdir`` into rows."""
    expdir = Path(expdir)
    models_dir = expdir / "models"
    if not expdir.is_dir():
        raise ReportError(f"experiment folder {expdir} does not exist")
    if not models_dir.is_dir():
        raise ReportError(f"{expdir} has no models/ folder, so it is not an experiment folder: the report reads "
                          "EXPDIR/models/<model>/model.json (see upstream_compressed/report.py); "
                          "run the pipeline (run_downstream.sh) into it first, or pass the folder it wrote")
    warnings: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    for folder in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        if not (folder / "model.json").is_file():
            warnings.append(f"skipped {folder}: no model.json")
            continue
        row = _read_model(folder)
        profile = folder / "profile.json"
        row["profile"] = _read_profile(profile) if profile.is_file() else None
        row["PR"] = row["SID"] = None
        rows[row["model"]] = row
    if not rows:
        raise ReportError(f"{models_dir} holds no model folder with a model.json; nothing to report")
    downstream = expdir / "downstream"
    folders = sorted(p for p in downstream.iterdir() if p.is_dir()) if downstream.is_dir() else []
    result_folders: dict[tuple[str, str], Path] = {}
    for folder in folders:
        if not (folder / "result.json").is_file():
            continue  # training not finished yet: its cells stay empty
        result = _read_result(folder)
        if result["model"] not in rows:
            warnings.append(f"skipped {folder / 'result.json'}: no models/{result['model']}/model.json")
            continue
        rows[result["model"]][result["task"]] = result
        result_folders[result["task"], result["model"]] = folder
    _add_statistics(rows, result_folders, resamples, seed)
    seconds = {row["profile"]["seconds_audio"] for row in rows.values() if row["profile"]}
    if len(seconds) > 1:
        raise ReportError(f"profiles under {models_dir} were measured on different audio lengths "
                          f"({', '.join(f'{s:g} s' for s in sorted(seconds))}), so their MACs and times do not "
                          "compare; profile every model with the same --seconds")
    ordered = sorted(rows.values(), key=lambda r: (r["method"] != "base", r["method"], r["rate"] is not None,
                                                   r["rate"] or 0.0, r["model"]))
    return Report(ordered, seconds.pop() if seconds else None, warnings, resamples, seed)


def _scaled(value: float, scale: float) -> str:
    """Two decimals from 1 up; three significant digits below, so a tiny model's 0.0123 is not 0.01."""
    value /= scale
    return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:#.3g}"


def _score_cell(entry: dict[str, Any] | None, intervals: bool = True) -> str | None:
    """``mean ± half-width`` (percent) where an interval exists, ``*`` if its difference from the base excludes 0;
    the plain score without ``intervals``."""
    if not entry:
        return None
    if entry.get("test_ci95") is None or not intervals:
        return f"{100 * entry['test']:.2f}"
    low, high = entry["test_ci95"]
    mark = "*" if statistics.excludes_zero((entry.get("vs_base") or {}).get("ci95")) else ""
    return f"{100 * entry['test_mean']:.2f} ± {100 * (high - low) / 2:.2f}{mark}"


def _has_statistics(report: Report) -> bool:
    return any(row[t] and row[t].get("test_ci95") is not None for row in report.rows for t in TASKS)


def _devices(report: Report) -> set[str]:
    return {row["profile"]["device"] for row in report.rows if row["profile"]}


def _interval_cells(entry: dict[str, Any] | None) -> list[str | None]:
    """The 95% interval's ends in percent (a CSV keeps numbers in its cells)."""
    if not entry or entry.get("test_ci95") is None:
        return [None, None]
    return [f"{100 * end:.2f}" for end in entry["test_ci95"]]


def table(report: Report, intervals: bool = True) -> tuple[list[str], list[list[str | None]]]:
    """Header and cells of the table; a missing value is None. Without ``intervals`` the score cells are plain
    numbers and the intervals' ends get columns of their own."""
    per = f" / {report.seconds_audio:g} s" if report.seconds_audio is not None else ""
    devices = sorted(_devices(report))
    mixed = len(devices) > 1  # then each RTF cell names its device
    timed = _timed_beside_base(report)
    header = ["method", "rate", "model", "params (M)", f"MACs (G{per})", f"eff. MACs (G{per})",
              f"RTF ({devices[0]})" if len(devices) == 1 else "RTF", *(["time / base"] if timed else []),
              "PER %", "SID acc %", "SID lr"]
    cells = []
    for row in report.rows:
        profile, pr, sid = row["profile"], row["PR"], row["SID"]
        rtf = None
        if profile:
            rtf = _scaled(profile["rtf"], 1) + (f" ({profile['device']})" if mixed else "")
        ratio = _time_ratio_cell(profile, intervals) if timed else []
        cells.append([
            row["method"],
            f"{row['rate']:g}" if row["rate"] is not None else None,
            row["model"],
            _scaled(profile["params"], 1e6) if profile else None,
            _scaled(profile["macs"], 1e9) if profile else None,
            _scaled(profile["macs_effective"], 1e9) if profile else None,
            rtf,
            *ratio,
            _score_cell(pr, intervals),
            _score_cell(sid, intervals),
            f"{sid['lr']:g}" if sid else None,
            *([] if intervals else [*_interval_cells(pr), *_interval_cells(sid)]),
        ])
    if not intervals:
        header += ["PER 95% low", "PER 95% high", "SID acc 95% low", "SID acc 95% high"]
        if timed:
            header += ["time / base q25", "time / base q75"]
            for row, cell in zip(report.rows, cells):
                quartiles = (row["profile"] or {}).get("time_ratio_iqr")
                cell += [f"{q:.3f}" for q in quartiles] if quartiles else [None, None]
    return header, cells


def _timed_beside_base(report: Report) -> bool:
    return any(row["profile"] and row["profile"].get("time_ratio_to_base") is not None for row in report.rows)


def _time_ratio_cell(profile: dict[str, Any] | None, intervals: bool) -> list[str | None]:
    """The median per-round time ratio to the base, with its 25th-75th percentile in the markdown table."""
    if not profile or profile.get("time_ratio_to_base") is None:
        return [None]
    ratio = f"{profile['time_ratio_to_base']:.3f}"
    if not intervals:
        return [ratio]
    q25, q75 = profile["time_ratio_iqr"]
    return [f"{ratio} ({q25:.3f}-{q75:.3f})"]


def markdown_table(report: Report) -> str:
    header, cells = table(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    lines += ["| " + " | ".join(MISSING if c is None else c for c in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def csv_table(report: Report) -> str:
    header, cells = table(report, intervals=False)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if c is None else c for c in row] for row in cells])
    return out.getvalue()


def markdown_report(report: Report) -> str:
    per = f"{report.seconds_audio:g} s" if report.seconds_audio is not None else "the profiled length"
    notes = (f"MACs and eff. MACs are per {per} of audio, in G (10^9); eff. MACs count only multiplications by "
             "non-zero weights (equal to MACs for models without weight sparsity) and are what the plots use. "
             "RTF = median wall-clock seconds / seconds of audio, each model profiled on its own; time / base (where "
             "measured) = the median over rounds timed interleaved with the base in one process of (model time / "
             "base time in that round), with the 25th-75th percentile of those ratios: compare models by it. PER (phone recognition) and SID accuracy "
             "(speaker identification) are test-set percentages; SID lr is the downstream learning rate, "
             "which SID accuracy depends on strongly. '-' = not measured yet.")
    plots = "\n".join(f"![{name.replace('_', ' ')}]({name}.png)" for name in PLOTS)
    return (f"# Compression trade-offs\n\n{markdown_table(report)}\n{notes}{_lr_search_note(report)}\n\n"
            f"{statistics_section(report)}{plots}\n")


def _lr_search_note(report: Report) -> str:
    """Which rows' learning rates were searched (SUPERB's protocol); '' if none."""
    searched = {f"{row['model']} {task}" for row in report.rows for task in TASKS
                if row[task] and row[task].get("lr_search")}
    if not searched:
        return ""
    return (f" Learning rates searched ({', '.join(sorted(searched))}): each rate trained with the first seed, "
            "the one with the best dev score chosen and tested with every seed, as SUPERB does; the chosen rate "
            "is the entry's lr (the SID lr column) and report.json's lr_search holds each rate's dev score.")


def _percent(value: float) -> str:
    return f"{100 * value:+.2f}"


def statistics_section(report: Report) -> str:
    """The note on intervals, the differences from the base, and the rows without intervals; '' if none."""
    if not _has_statistics(report):
        missing = [f"{row['model']} {t}" for row in report.rows for t in TASKS if row[t]]
        return (f"No interval: no per-utterance test output was found ({', '.join(missing)}); "
                "report.json's stats_note says why.\n\n") if missing else ""
    lines = [f"PER and SID accuracy cells with ± show the mean over runs (seeds) ± half the width of its 95% "
             f"interval ({statistics.METHOD}; {report.resamples} resamples, seed {report.seed}; the interval "
             "itself, which need not be symmetric, is test_ci95 in report.json). * marks a model whose "
             "difference from the base has a 95% interval that excludes 0.", ""]
    diffs = [(row, t) for row in report.rows for t in TASKS if row[t] and row[t].get("vs_base")]
    if diffs:
        lines += ["Differences from the base (this model minus the base, percentage points; PER: positive = more "
                  "errors; accuracy: positive = better):", "",
                  "| model | task | runs | diff | 95% interval | p |", "|---|---|---:|---:|---:|---:|"]
        for row, t in diffs:
            vs = row[t]["vs_base"]
            mark = "*" if statistics.excludes_zero(vs["ci95"]) else ""
            lines.append(f"| {row['model']} | {t} | {len(row[t]['test_runs'])} | {_percent(vs['diff'])}{mark} | "
                         f"[{_percent(vs['ci95'][0])}, {_percent(vs['ci95'][1])}] | {vs['p']:.3g} |")
        lines.append("")
    notes = [f"{row['model']} {t}: {row[t]['stats_note']}" for row in report.rows for t in TASKS
             if row[t] and row[t].get("stats_note")]
    if notes:
        lines += ["Not computed:", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines) + "\n"


def _seconds_label(report: Report) -> str:
    devices = _devices(report)
    where = devices.pop() if len(devices) == 1 else "mixed devices, see table"
    return f"median wall-clock seconds per {report.seconds_audio:g} s of audio ({where})"


def _metric_label(report: Report, task: str) -> str:
    if task == "PR":
        return "PER % (test, lower is better)"
    lrs = {row["SID"]["lr"] for row in report.rows if row["SID"]}
    lr = f"downstream lr {lrs.pop():g}" if len(lrs) == 1 else "downstream lr per model in the table"
    return f"SID accuracy % (test, {lr})"


def _figure(report: Report, task: str, x_of: str, title: str, xlabel: str) -> Figure:
    """One trade-off plot: a line per method over its rates, each base model as a star."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 5.0), layout="constrained")
    FigureCanvasAgg(figure)  # Agg: renders without a display, and no pyplot global state
    axes = figure.add_subplot()
    methods = sorted({row["method"] for row in report.rows if row["method"] != "base"})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}  # the same colour per method on every plot

    def point(row: dict[str, Any]) -> tuple[float, float] | None:
        if not row["profile"] or not row[task]:
            return None
        scale = 1e9 if x_of == "macs_effective" else 1.0
        mean = row[task].get("test_mean")
        return row["profile"][x_of] / scale, 100 * (row[task]["test"] if mean is None else mean)

    def error_bars(rows: list[dict[str, Any]], colour: str) -> None:
        """The 95% intervals (test_ci95) of the rows that have one, as vertical bars."""
        xs, ys, below, above = [], [], [], []
        for row in rows:
            if (p := point(row)) is not None and (interval := row[task].get("test_ci95")) is not None:
                xs.append(p[0])
                ys.append(p[1])
                below.append(max(0.0, p[1] - 100 * interval[0]))  # a percentile interval need not hold the mean
                above.append(max(0.0, 100 * interval[1] - p[1]))
        if xs:
            axes.errorbar(xs, ys, yerr=[below, above], fmt="none", ecolor=colour, elinewidth=1, capsize=3,
                          label="_nolegend_")

    drawn = 0
    for method in methods:
        rows = [(point(r), r["rate"]) for r in report.rows if r["method"] == method]
        rows = sorted((p, rate) for p, rate in rows if p is not None)
        if not rows:
            continue
        axes.plot([p[0] for p, _ in rows], [p[1] for p, _ in rows], marker="o", color=colours[method], label=method)
        error_bars([r for r in report.rows if r["method"] == method], colours[method])
        for (x, y), rate in rows:
            if rate is not None:
                axes.annotate(f"{rate:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        drawn += 1
    for row in report.rows:
        if row["method"] == "base" and (p := point(row)) is not None:
            axes.plot([p[0]], [p[1]], marker="*", markersize=14, linestyle="none", color="black",
                      label=f"base ({row['model']})")
            error_bars([row], "black")
            drawn += 1
    if drawn:
        axes.legend(fontsize=8)
    else:
        axes.text(0.5, 0.5, f"no model has both a profile and a {task} result yet", ha="center", va="center",
                  transform=axes.transAxes)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(_metric_label(report, task))
    axes.grid(alpha=0.3)
    return figure


def figures(report: Report) -> dict[str, Figure]:
    """The three plots, by file stem."""
    seconds = f"{report.seconds_audio:g} s" if report.seconds_audio is not None else "the profiled length"
    macs = (f"effective MACs, G per {seconds} of audio\n"
            "(non-zero weights only; equal to dense MACs for non-sparse models)")
    return {
        "per_vs_macs": _figure(report, "PR", "macs_effective", "Phone recognition vs compute", macs),
        "acc_vs_macs": _figure(report, "SID", "macs_effective", "Speaker identification vs compute", macs),
        "per_vs_seconds": _figure(report, "PR", "median_seconds", "Phone recognition vs wall-clock time",
                                  _seconds_label(report) if report.seconds_audio is not None else "median seconds"),
    }


def write_report(expdir: str | Path, outdir: str | Path | None = None) -> tuple[Report, list[Path]]:
    """Read ``expdir``, write the table, plots and ``expdir/report.json``; returns the report and files written."""
    expdir = Path(expdir)
    outdir = Path(outdir) if outdir is not None else expdir
    report = load_report(expdir)
    written: list[Path] = []

    def write(path: Path, data: bytes) -> None:
        atomic_write_bytes(path, data)
        written.append(path)

    write(outdir / "report.md", markdown_report(report).encode())
    write(outdir / "report.csv", csv_table(report).encode())
    for name, figure in figures(report).items():
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=120)
        write(outdir / f"{name}.png", png.getvalue())
    merged = {"seconds_audio": report.seconds_audio, "rows": report.rows,
              "statistics": {"method": statistics.METHOD, "resamples": report.resamples, "seed": report.seed,
                             "level": statistics.LEVEL}}
    write(expdir / "report.json", (json.dumps(merged, indent=2, allow_nan=False) + "\n").encode())
    return report, written

