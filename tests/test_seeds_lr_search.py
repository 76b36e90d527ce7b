"""``experiment --seeds`` and SUPERB's learning-rate search: real S3PRL runs, one expdir per run, combined results.

One module-scoped experiment (the quick plan's base and heads50, SID only, 2 steps per run, seeds 0 and 1,
rates 1e-2 and 1e-3: 3 runs per model) serves every check; the reruns work on copies of it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from upstream_compressed.cli import main
from upstream_compressed.experiments import TASKS, PlanError, TaskRuns, load_plan, run_plan, task_runs

REPO = Path(__file__).resolve().parents[1]
PLAN = REPO / "recipes" / "quick" / "plan.yaml"
RATES = [0.01, 0.001]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """A real make-corpus corpus (espeak-ng speech, both layouts), as small as it goes."""
    from upstream_compressed.embedded.synth_corpus import CorpusOptions, make_corpus

    options = CorpusOptions(speakers=3, utterances=4, sid_utterances=5)
    return make_corpus(tmp_path_factory.mktemp("synth") / "corpus", options, progress=False).root


def experiment_args(expdir: Path, corpus: Path, *extra: str) -> list[str]:
    return ["experiment", str(PLAN), "--corpus", str(corpus), "--expdir", str(expdir), "--tasks", "sid",
            "--sid-steps", "2", "--jobs", "2", "--quiet", *extra]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tiny_corpus) -> Path:
    """The issue's command, then the report."""
    expdir = tmp_path_factory.mktemp("seeds") / "exp"
    assert main(experiment_args(expdir, tiny_corpus, "--models", "base,heads50", "--seeds", "0,1",
                                "--sid-lr-search", "1e-2,1e-3")) == 0
    assert main(["report", str(expdir)]) == 0
    return expdir


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def chosen_by_dev(folder: Path) -> float:
    """The searched rate with the best (highest) dev accuracy of the first seed's runs; a tie: the first listed."""
    devs = {rate: read(folder / "runs" / f"lr{rate!r}-seed0" / "result.json")["dev_best"] for rate in RATES}
    return max(devs, key=devs.__getitem__)


def test_the_report_has_both_seeds_intervals_and_the_chosen_rate(experiment):
    rows = {row["model"]: row for row in read(experiment / "report.json")["rows"]}
    for model in ("base", "heads50"):
        folder = experiment / "downstream" / f"sid_{model}"
        combined = read(folder / "result.json")
        sid = rows[model]["SID"]
        chosen = chosen_by_dev(folder)
        assert sid["lr"] == combined["lr"] == chosen
        assert sid["lr_search"] == {
            repr(rate): read(folder / "runs" / f"lr{rate!r}-seed0" / "result.json")["dev_best"] for rate in RATES}
        assert sid["seeds"] == SEEDS and sid["runs"] == [f"runs/lr{chosen!r}-seed{seed}" for seed in SEEDS]
        runs = [read(folder / run / "result.json") for run in combined["runs"]]
        assert [r["seed"] for r in runs] == SEEDS and all(r["lr"] == chosen for r in runs)
        assert len(sid["test_runs"]) == 2
        assert sid["test_runs"] == [pytest.approx(r["test"], abs=1e-6) for r in runs]
        assert sid["test"] == pytest.approx(sum(r["test"] for r in runs) / 2)
        assert sid["test_mean"] == pytest.approx(sid["test"], abs=1e-6)
        low, high = sid["test_ci95"]
        assert low <= sid["test_mean"] <= high and sid["stats_note"] is None
        every_run = [read(p) for p in (folder / "runs").glob("*/result.json")]
        assert len(every_run) == 3  # 2 rates + 2 seeds - 1: the other seed runs at the chosen rate only
        assert combined["train_seconds"] == pytest.approx(sum(r["train_seconds"] for r in every_run), abs=0.2)
        assert combined["steps"] == 2 and len(combined["dev_history"]) == 2
    assert rows["base"]["SID"]["vs_base"] is None
    assert set(rows["heads50"]["SID"]["vs_base"]) == {"diff", "ci95", "p"}
    assert "Learning rates searched (base SID, heads50 SID)" in (experiment / "report.md").read_text()


def test_each_seed_reaches_s3prl(experiment):
    """S3PRL records its arguments in every expdir it runs in: each run's args_*.yaml holds its own seed."""
    for run in (experiment / "downstream" / "sid_base" / "runs").iterdir():
        seed = int(run.name.rsplit("seed", 1)[1])
        recorded = {yaml.safe_load(p.read_text())["seed"] for p in run.glob("args_*.yaml")}
        assert recorded == {seed} and read(run / "result.json")["seed"] == seed
        assert f"--seed {seed}" in (run / "train.log").read_text()


def stamps(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("result.json")}


def test_a_removed_run_is_redone_alone_and_other_seeds_recompute_the_combined_result(experiment, tmp_path,
                                                                                     tiny_corpus):
    expdir = tmp_path / "exp"
    shutil.copytree(experiment, expdir)
    folder = expdir / "downstream" / "sid_base"
    before = read(folder / "result.json")
    removed = folder / before["runs"][1] / "result.json"
    removed.unlink()
    kept = stamps(expdir)
    search = ["--models", "base", "--sid-lr-search", "1e-2,1e-3"]
    assert main(experiment_args(expdir, tiny_corpus, *search, "--seeds", "0,1")) == 0
    after = stamps(expdir)
    changed = {p for p in after if after[p] != kept.get(p)}
    assert changed == {removed, folder / "result.json"}  # only that run trained again
    assert read(removed)["seed"] == 1 and read(folder / "result.json")["runs"] == before["runs"]

    kept = stamps(expdir)  # another seed list: the combined result is not reused, no run trains again
    assert main(experiment_args(expdir, tiny_corpus, *search, "--seeds", "0")) == 0
    after = stamps(expdir)
    assert {p for p in after if after[p] != kept[p]} == {folder / "result.json"}
    combined = read(folder / "result.json")
    assert combined["seeds"] == [0] and combined["runs"] == [f"runs/lr{chosen_by_dev(folder)!r}-seed0"]
    assert combined["test"] == read(folder / combined["runs"][0] / "result.json")["test"]


def test_without_seeds_a_folder_of_runs_is_refused(experiment, tiny_corpus):
    plan = load_plan(PLAN, corpus=tiny_corpus)
    with pytest.raises(PlanError, match=r"sid_base holds runs of seeds or a learning-rate search"):
        run_plan(plan, experiment, ["sid"], models=["base"], progress=False)


def test_a_missing_run_folder_is_a_report_error(experiment, tmp_path, capsys):
    expdir = tmp_path / "exp"
    shutil.copytree(experiment, expdir, ignore=shutil.ignore_patterns("*.ckpt"))
    run = read(expdir / "downstream" / "sid_heads50" / "result.json")["runs"][0]
    shutil.rmtree(expdir / "downstream" / "sid_heads50" / run)
    assert main(["report", str(expdir)]) == 2
    assert f"its run folder(s) {run} are missing" in capsys.readouterr().err


# ------------------------------------------------------------------ no S3PRL runs below
def test_runs_cost_rates_plus_seeds_minus_one(tmp_path):
    plan = replace(load_plan(PLAN, corpus=tmp_path), seeds=[0, 1, 2], lr_search={"sid": [0.1, 0.01, 0.001, 0.0001]})
    work = task_runs(TASKS["sid"], {"model": "m"}, plan, tmp_path)
    assert work.total == 6 and [r.folder.name for r in work.first_runs()] == [
        "lr0.1-seed0", "lr0.01-seed0", "lr0.001-seed0", "lr0.0001-seed0"]
    fixed = task_runs(TASKS["sid"], {"model": "m", "downstream_lr": 0.05}, plan, tmp_path)
    assert fixed.rates is None and fixed.total == 3 and {r.lr for r in fixed.first_runs()} == {0.05}
    pr = task_runs(TASKS["pr"], {"model": "m"}, plan, tmp_path)  # seeds at the config's rate
    assert pr.total == 3 and pr.first_runs()[0].folder.name == "lr0.01-seed0"
    plan.seeds = None
    alone = task_runs(TASKS["sid"], {"model": "m"}, plan, tmp_path)  # a search without seeds: S3PRL's seed
    assert alone.seeds == [1337] and alone.total == 4
    plan.lr_search = {}
    single = task_runs(TASKS["sid"], {"model": "m"}, plan, tmp_path)
    assert single.seeds is None and single.total == 1 and single.first_runs()[0].folder == tmp_path / "downstream" / "sid_m"


@pytest.mark.parametrize("task, devs, chosen", [
    ("sid", [0.5, 0.7, 0.7], 0.01),  # the highest accuracy; a tie goes to the rate listed first
    ("pr", [0.5, 0.3, 0.3], 0.01),  # the lowest PER
    ("sid", [0.4, 0.4, 0.4], 0.1),
    ("sid", [None, 0.2, 0.1], 0.01),  # a run that printed no dev score is never chosen
])
def test_the_best_dev_score_chooses_the_rate(tmp_path, task, devs, chosen):
    rates = [0.1, 0.01, 0.001]
    work = TaskRuns(TASKS[task], {"model": "m"}, tmp_path, [0], rates, None)
    work.results = {work.run(rate, 0).folder: {"dev_best": dev} for rate, dev in zip(rates, devs)}
    assert work.choose() == chosen


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0,0"], "--seeds: seed(s) 0 given more than once"),
    (["--seeds=-1"], "--seeds: seed -1 must be an integer from 0"),
    (["--seeds", "1.5"], "--seeds: '1.5' is not an integer"),
    (["--seeds", "0,,1"], "--seeds '0,,1': give a comma-separated list"),
    (["--sid-lr-search", "1e-2,x"], "--sid-lr-search: 'x' is not a number"),
    (["--sid-lr-search", "0"], "--sid-lr-search: learning rate 0.0 must be a positive number"),
    (["--pr-lr-search=-1e-3"], "--pr-lr-search: learning rate -0.001 must be a positive number"),
    (["--pr-lr-search", "nan"], "--pr-lr-search: learning rate nan must be a positive number"),
    (["--pr-lr-search", "1e-2,0.01"], "--pr-lr-search: learning rate(s) 0.01 given more than once"),
])
def test_bad_flags_are_named(tmp_path, capsys, args, message):
    assert main(experiment_args(tmp_path / "exp", tmp_path, *args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("upstream-compressed experiment: error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("fields, message", [
    ({"seeds": [0, 0]}, "seeds: seed(s) 0 given more than once"),
    ({"seeds": "0,1"}, "seeds: expected a non-empty list of seeds"),
    ({"seeds": [True]}, "seeds: seed True must be an integer"),
    ({"seeds": []}, "seeds: expected a non-empty list"),
    ({"sid_lr_search": [0.01, "x"]}, "sid_lr_search: learning rate 'x' must be a positive number"),
    ({"pr_lr_search": [0]}, "pr_lr_search: learning rate 0 must be a positive number"),
    ({"pr_lr_search": 0.01}, "pr_lr_search: expected a non-empty list of learning rates"),
])
def test_bad_plan_fields_are_named(tmp_path, fields, message):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"corpus": str(tmp_path), "pr_config": "ctc_libriphone_tiny",
                                    "sid_config": "voxceleb1_tiny", "models": [{"name": "a", "method": "base"}],
                                    **fields}))
    with pytest.raises(PlanError) as error:
        load_plan(plan)
    assert f"{plan}: {message}" in str(error.value)


def test_plan_fields_are_read(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"corpus": str(tmp_path), "pr_config": "ctc_libriphone_tiny",
                                    "sid_config": "voxceleb1_tiny", "models": [{"name": "a", "method": "base"}],
                                    "seeds": [2, 0], "sid_lr_search": [1, 1e-3]}))
    loaded = load_plan(plan)
    assert loaded.seeds == [2, 0] and loaded.lr_search == {"sid": [1.0, 0.001]}
