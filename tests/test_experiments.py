"""Plans: the shipped one is valid, bad ones are refused naming the field, and a tiny plan runs end to end."""

import json
from pathlib import Path

import pytest
import yaml

from upstream_compressed.bundled import RECIPES
from upstream_compressed.experiments import PlanError, load_plan, run_plan

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """A real make-corpus corpus (espeak-ng speech, both layouts), as small as it goes."""
    from upstream_compressed.embedded.synth_corpus import CorpusOptions, make_corpus

    options = CorpusOptions(speakers=3, utterances=4, sid_utterances=5)
    return make_corpus(tmp_path_factory.mktemp("synth") / "corpus", options, progress=False).root


@pytest.mark.parametrize("name", ["quick", "tiny"])
def test_shipped_plans_are_valid_by_name_and_by_checkout_path(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # by name from any folder
    plan = load_plan(name, corpus="c")
    assert plan.path == RECIPES / name / "plan.yaml" and plan.corpus == tmp_path / "c"
    assert all(Path(m.recipe).is_file() for m in plan.models if m.recipe)
    assert all(config.is_file() for config in plan.configs.values())
    shipped = {p.stem for p in (RECIPES / name).glob("*.yaml")} - {"plan"}
    assert {Path(m.recipe).stem for m in plan.models if m.recipe} == shipped  # every recipe of the set is scored
    if name == "tiny":
        assert {"base", "random_init", "fbank", "kd", "kd_head_lr"} <= {m.name for m in plan.models}
    monkeypatch.chdir(REPO)  # the checkout's path (recipes/ links into the package) reads the same plan
    assert load_plan(f"recipes/{name}/plan.yaml", corpus=tmp_path / "c").models == plan.models


def test_a_bundled_plan_without_a_corpus_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv("CORPUS", raising=False)
    with pytest.raises(PlanError, match=r"corpus: environment variable CORPUS is not set .*give --corpus DIR"):
        load_plan("quick")
    with pytest.raises(PlanError, match=r"plan nope does not exist, and it is no bundled plan name \(quick, tiny\)"):
        load_plan("nope")


def write_plan(tmp_path, models, **fields):
    data = {"corpus": str(tmp_path), "pr_config": "ctc_libriphone_tiny", "sid_config": "voxceleb1_tiny",
            "models": models, **fields}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("models, message", [
    ([], "'models' is empty"),
    ([{"name": "a"}], r"models\[0\]: each model needs 'name' and 'method'"),
    ([{"name": "a", "method": "head_pruning"}], r"models\[0\]: method 'head_pruning' needs 'recipe'"),
    ([{"name": "a", "method": "base", "recipe": "x.yaml"}], r"models\[0\]: method base takes no 'recipe'"),
    ([{"name": "a", "method": "base"}, {"name": "a", "method": "fbank"}], r"models\[1\]: name 'a' must be unique"),
    ([{"name": "a", "method": "x", "recipe": "missing.yaml"}], r"models\[0\]\.recipe: file .*missing.yaml does not exist"),
    ([{"name": "a", "method": "checkpoint", "upstream": "hubert_local", "ckpt": "no.pt"}],
     r"models\[0\]\.ckpt: file .*no.pt does not exist"),
    ([{"name": "a", "method": "base", "colour": 1}], r"models\[0\]: unknown field\(s\) colour"),
])
def test_bad_plans_are_refused_naming_the_field(tmp_path, models, message):
    with pytest.raises(PlanError, match=message):
        load_plan(write_plan(tmp_path, models))


def test_a_missing_config_or_corpus_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_CORPUS", raising=False)
    with pytest.raises(PlanError, match="environment variable NO_SUCH_CORPUS is not set"):
        load_plan(write_plan(tmp_path, [{"name": "a", "method": "base"}], corpus="${NO_SUCH_CORPUS}/x"))
    with pytest.raises(PlanError, match="pr_config: .*nope.yaml does not exist"):
        load_plan(write_plan(tmp_path, [{"name": "a", "method": "base"}], pr_config="nope.yaml"))


def test_a_plan_runs_pr_and_sid_and_resumes(tmp_path, hubert_ckpt, tiny_corpus, capsys):
    """Base + a head-pruned recipe through S3PRL's real PR and SID; a second run reuses every result."""
    recipe = tmp_path / "heads.yaml"
    recipe.write_text(f"base: {hubert_ckpt}\nsteps:\n  - {{method: head_pruning, ratio: 0.5, criterion: l1}}\n")
    plan = load_plan(write_plan(tmp_path, [
        {"name": "base", "method": "base", "upstream": "hubert_local"},
        {"name": "heads50", "method": "head_pruning", "rate": 0.5, "recipe": str(recipe), "upstream": "hubert_headpruned"},
    ], base=str(hubert_ckpt)), corpus=str(tiny_corpus))
    expdir = tmp_path / "exp"
    results = run_plan(plan, expdir, ["pr", "sid"], jobs=2, progress=False, steps={"pr": 4, "sid": 4})
    assert "done compress heads50" in capsys.readouterr().out
    assert sorted((r["task"], r["model"]) for r in results) == [
        ("PR", "base"), ("PR", "heads50"), ("SID", "base"), ("SID", "heads50")]
    for r in results:
        assert 0.0 <= r["test"] and r["steps"] == 4 and r["metric"] == {"PR": "per", "SID": "acc"}[r["task"]]
    model = json.loads((expdir / "models" / "heads50" / "model.json").read_text())
    assert model["upstream"] == "hubert_headpruned" and Path(model["ckpt"]).is_file()
    assert (expdir / "downstream" / "pr_heads50" / "dev-best.ckpt").is_file()

    stamps = {p: p.stat().st_mtime_ns for p in expdir.rglob("result.json")}
    again = run_plan(plan, expdir, ["pr", "sid"], jobs=2, progress=False, steps={"pr": 4, "sid": 4})
    assert sorted(json.dumps(r, sort_keys=True) for r in again) == sorted(json.dumps(r, sort_keys=True) for r in results)
    assert {p: p.stat().st_mtime_ns for p in expdir.rglob("result.json")} == stamps  # nothing re-ran
    assert "done compress" not in capsys.readouterr().out  # a kept delta is not reported as new work


def test_a_killed_downstream_run_resumes_from_its_last_saved_state(tmp_path, hubert_ckpt, tiny_corpus, monkeypatch):
    """Killed after 2 of 4 steps: S3PRL's own resume continues there; killed before its test: only the test runs."""
    from upstream_compressed import experiments

    plan = load_plan(write_plan(tmp_path, [{"name": "base", "method": "base", "upstream": "hubert_local"}],
                                base=str(hubert_ckpt)), corpus=str(tiny_corpus))
    model = experiments.prepare_model(plan.models[0], plan, tmp_path / "exp", {})
    folder = tmp_path / "exp" / "downstream" / "pr_base"
    real_run = experiments._run

    def killed_at_the_test(command, log, env, append=False):
        if "evaluate" in command:
            raise KeyboardInterrupt  # what a kill between training and test leaves behind
        return real_run(command, log, env, append)

    monkeypatch.setattr(experiments, "_run", killed_at_the_test)
    with pytest.raises(KeyboardInterrupt):
        experiments.run_downstream(experiments.TASKS["pr"], model, plan, tmp_path / "exp", "cpu", {}, steps=2)
    assert (folder / "states-2.ckpt").is_file() and not (folder / "result.json").exists()

    monkeypatch.setattr(experiments, "_run", real_run)  # a 4-step run continues from step 2
    result = experiments.run_downstream(experiments.TASKS["pr"], model, plan, tmp_path / "exp", "cpu", {}, steps=4)
    assert result["steps"] == 4 and result["resumed_from_step"] == 2
    log = (folder / "train.log").read_text()
    assert log.count("$ ") == 2 and "Resume from" in log and str(folder / "states-2.ckpt") in log

    (folder / "result.json").unlink()  # as if killed during the test: training is not run again
    for name in ("train.log", "dev-best.ckpt"):
        assert (folder / name).is_file()
    (folder / "states-4.ckpt").write_bytes(b"")  # the finished training's last state (cleaned up after a result)
    before = (folder / "train.log").read_text()
    again = experiments.run_downstream(experiments.TASKS["pr"], model, plan, tmp_path / "exp", "cpu", {}, steps=4)
    assert (folder / "train.log").read_text() == before
    assert again["test"] == result["test"] and again["resumed_from_step"] == 4
