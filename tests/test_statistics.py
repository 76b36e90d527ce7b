"""Per-utterance scores from S3PRL's own files, the two-level bootstrap, and their fields in the report.

The PER and accuracy aggregations are checked against S3PRL's own code: its experts' ``log_records``
write the hypothesis / prediction files and print the test metric, exactly as ``-m evaluate`` does.
The bootstrap is checked on constructed scores whose truth is known: a known difference is found,
equal systems give p about uniform, and the intervals hold the truth at about the nominal rate.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import types
from pathlib import Path

import numpy as np
import pytest

from upstream_compressed import statistics
from upstream_compressed.statistics import (
    Runs,
    StatisticsError,
    UtteranceScores,
    confidence_interval,
    paired_difference,
    read_pr_scores,
    read_run,
    read_sid_scores,
    task_statistics,
)

VOCAB = Path(statistics.__file__).parent / "corpus" / "phoneme.txt"  # SUPERB's phones
PHONES = [line.strip() for line in VOCAB.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ S3PRL's own writers and metrics
class _Logger:
    def add_scalar(self, *args, **kwargs) -> None:
        pass


@pytest.fixture(scope="module")
def s3prl_experts():
    """S3PRL's ctc and voxceleb1 experts (their log_records is what ``-m evaluate`` runs at the end)."""
    from upstream_compressed import s3prl_compat

    s3prl_compat.apply()
    from s3prl.downstream.ctc.expert import DownstreamExpert as CtcExpert
    from s3prl.downstream.voxceleb1.expert import DownstreamExpert as SidExpert

    return CtcExpert, SidExpert


def _printed(output: str, metric: str) -> float:
    (value,) = re.findall(rf"^test {metric}: (\S+)$", output, flags=re.MULTILINE)
    return float(value)  # what experiments.run_downstream parses into result.json's test


def s3prl_pr(experts, expdir: Path, ids: list[str], hyps: list[str], refs: list[str]) -> float:
    """S3PRL's ctc expert writes test-hyp.ark / test-ref.ark into ``expdir`` and prints its test PER."""
    expdir.mkdir(parents=True, exist_ok=True)
    expert = types.SimpleNamespace(metrics=["per"], metric_higher_better=False, best_score=1.0, save_best_on=["dev"],
                                   expdir=str(expdir), _get_task_name=lambda: "ctc")
    records = {"loss": [1.0], "hypothesis": list(hyps), "groundtruth": list(refs), "filename": list(ids)}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        experts[0].log_records(expert, "test", records, _Logger(), 0)
    return _printed(out.getvalue(), "per")


def s3prl_sid(experts, expdir: Path, ids: list[str], predicted: list[int], truth: list[int]) -> float:
    """S3PRL's voxceleb1 expert writes test_predict.txt / test_truth.txt and prints its test accuracy."""
    expdir.mkdir(parents=True, exist_ok=True)
    expert = types.SimpleNamespace(expdir=str(expdir), best_score=0.0)
    from s3prl.downstream.voxceleb1.dataset import SpeakerClassifiDataset

    speaker = SpeakerClassifiDataset.label2speaker  # as the expert names the speakers
    records = {"acc": [float(p == t) for p, t in zip(predicted, truth)], "loss": [1.0], "filename": list(ids),
               "predict_speaker": speaker(predicted), "truth_speaker": speaker(truth)}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        experts[1].log_records(expert, "test", records, _Logger(), 0)
    return _printed(out.getvalue(), "acc")


def corrupt(rng: np.random.Generator, refs: list[str], error_rate: float) -> list[str]:
    """Hypotheses with substitutions, deletions and insertions; the first one empty (one empty token to S3PRL)."""
    hyps = []
    for ref in refs:
        hyp = []
        for phone in ref.split(" "):
            u = rng.random()
            if u < error_rate / 3:
                hyp.append(str(rng.choice(PHONES)))  # substitution (or, by chance, none)
            elif u < 2 * error_rate / 3:
                continue  # deletion
            elif u < error_rate:
                hyp += [phone, str(rng.choice(PHONES))]  # insertion
            else:
                hyp.append(phone)
        hyps.append(" ".join(hyp))
    hyps[0] = ""
    return hyps


def random_transcripts(rng: np.random.Generator, n: int, error_rate: float) -> tuple[list[str], list[str], list[str]]:
    """LibriSpeech-style ids, hypotheses and references (1 to 39 phones)."""
    ids = [f"{1000 + i % 7}-{2000 + i % 3}-{i:04d}" for i in range(n)]
    refs = [" ".join(rng.choice(PHONES, int(rng.integers(1, 40)))) for _ in range(n)]
    return ids, corrupt(rng, refs, error_rate), refs


def test_per_from_the_files_equals_s3prls_own_test_per_exactly(tmp_path, s3prl_experts):
    from s3prl.downstream.ctc.metric import per as s3prl_per

    ids, hyps, refs = random_transcripts(np.random.default_rng(0), 300, 0.2)
    printed = s3prl_pr(s3prl_experts, tmp_path, ids, hyps, refs)
    scores = read_pr_scores(tmp_path / "test-hyp.ark", tmp_path / "test-ref.ark")
    assert scores.score == printed  # exactly: what S3PRL printed (and result.json holds)
    assert scores.score == s3prl_per(hypothesis=hyps, groundtruth=refs)  # and its metric function on the same text
    assert Runs.of([scores]).scores == [printed] == confidence_interval(Runs.of([scores]), resamples=50)["test_runs"]
    # Per utterance: S3PRL's own metric on that one utterance, times its reference length.
    by_id = dict(zip(ids, zip(hyps, refs)))
    for key, errors, length in list(zip(scores.ids, scores.numerator, scores.denominator))[:50]:
        hyp, ref = by_id[key]
        assert length == len(ref.split(" ")) and errors == round(s3prl_per([hyp], [ref]) * length)
    assert scores.ids == tuple(sorted(ids))  # held in id order, whatever order S3PRL wrote


def test_accuracy_from_the_files_equals_s3prls_own_test_accuracy(tmp_path, s3prl_experts):
    rng = np.random.default_rng(1)
    truth = [int(t) for t in rng.integers(0, 1251, 500)]
    predicted = [t if rng.random() < 0.7 else int(rng.integers(0, 1251)) for t in truth]
    ids = [f"id1{t + 1:04d}-vid{i}-{i:05d}" for i, t in enumerate(truth)]
    printed = s3prl_sid(s3prl_experts, tmp_path, ids, predicted, truth)
    scores = read_sid_scores(tmp_path / "test_predict.txt", tmp_path / "test_truth.txt")
    exact = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    assert scores.score == exact
    assert printed == pytest.approx(exact, abs=1e-6)  # S3PRL prints a float32 mean
    assert read_run(tmp_path, "SID").score == exact


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "test-ref.ark").write_text("a x\nb y\n"), r"1 only in the first, 0 only in the second"),
    (lambda d: (d / "test-hyp.ark").write_text("a x\nb y"), "does not end with a newline"),
    (lambda d: (d / "test-hyp.ark").write_text("a x\na y\n"), "appears twice"),
    (lambda d: (d / "test-hyp.ark").unlink(), "no test-hyp.ark"),
    (lambda d: (d / "test-hyp.ark").write_text(""), "is empty"),
])
def test_broken_per_utterance_files_are_refused_naming_the_problem(tmp_path, damage, message):
    (tmp_path / "test-hyp.ark").write_text("a x\nb y\nc z\n")
    (tmp_path / "test-ref.ark").write_text("a x\nb y\nc z\n")
    assert read_run(tmp_path, "PR").score == 0
    damage(tmp_path)
    with pytest.raises(StatisticsError, match=message):
        read_run(tmp_path, "PR")


# ------------------------------------------------------------------ constructed scores
def sid_runs(rng: np.random.Generator, p_correct: np.ndarray, seeds: int = 1) -> Runs:
    ids = tuple(f"u{i:05d}" for i in range(len(p_correct)))
    return Runs.of([UtteranceScores("SID", ids, (rng.random(len(ids)) < p_correct).astype(np.int64),
                                    np.ones(len(ids), np.int64)) for _ in range(seeds)])


def pr_runs(rng: np.random.Generator, lengths: np.ndarray, q: np.ndarray, seeds: int = 1) -> Runs:
    ids = tuple(f"u{i:05d}" for i in range(len(lengths)))
    return Runs.of([UtteranceScores("PR", ids, rng.binomial(lengths, q).astype(np.int64), lengths.astype(np.int64))
                    for _ in range(seeds)])


def tolerance(draws: int, rate: float, sigmas: float = 3.5) -> tuple[float, float]:
    """A binomial acceptance range for a count of ``draws`` events at ``rate``."""
    spread = sigmas * np.sqrt(draws * rate * (1 - rate))
    return draws * rate - spread, draws * rate + spread


def test_a_known_difference_is_found():
    """A system that fixes 2% of the base's utterances (and breaks none): +0.02, interval excludes 0, p small."""
    rng = np.random.default_rng(2)
    base = sid_runs(rng, rng.uniform(0.3, 0.95, 2000))
    better = base.numerator.copy()
    wrong = np.flatnonzero(better[0] == 0)
    better[0, rng.choice(wrong, 40, replace=False)] = 1
    system = Runs("SID", base.ids, better, base.denominator)
    vs = paired_difference(system, base)
    assert vs["diff"] == pytest.approx(0.02)
    assert 0 < vs["ci95"][0] < 0.02 < vs["ci95"][1] and vs["p"] < 0.01
    assert statistics.excludes_zero(vs["ci95"])
    # The same difference, PER: more errors on some utterances.
    lengths = rng.integers(5, 60, 1000)
    base = pr_runs(rng, lengths, rng.beta(2, 20, 1000))
    worse = Runs("PR", base.ids, base.numerator + (rng.random(1000) < 0.3), base.denominator)
    vs = paired_difference(worse, base)
    assert vs["diff"] > 0 and vs["ci95"][0] > 0 and vs["p"] < 0.01
    assert paired_difference(base, worse)["ci95"][1] < 0  # and the other way round


def test_equal_systems_give_p_about_uniform():
    """Two systems drawn from the same per-utterance model, 200 times: p < 0.05 in about 5% of the draws."""
    rng = np.random.default_rng(3)
    draws, p = 200, []
    for draw in range(draws):
        difficulty = rng.beta(3, 1.5, 300)  # shared by both: the utterances are the same
        p.append(paired_difference(sid_runs(rng, difficulty), sid_runs(rng, difficulty), resamples=400, seed=draw)["p"])
    p = np.array(p)
    low, high = tolerance(draws, 0.05)
    assert low <= np.sum(p < 0.05) <= high
    low, high = tolerance(draws, 0.5)
    assert low <= np.sum(p < 0.5) <= high
    assert np.all((p > 0) & (p <= 1))


def test_intervals_hold_the_truth_at_about_95_percent():
    """Population PER a/(a+b) and a known accuracy difference: each interval covers it in about 95% of draws."""
    rng = np.random.default_rng(4)
    draws, covered_per, covered_diff = 400, 0, 0
    for draw in range(draws):
        lengths = rng.integers(5, 80, 300)
        ci = confidence_interval(pr_runs(rng, lengths, rng.beta(2, 18, 300)), resamples=400, seed=draw)["test_ci95"]
        covered_per += ci[0] <= 0.1 <= ci[1]  # E[errors] / E[length] = E[q] = 2 / 20
        difficulty = rng.uniform(0.2, 0.9, 300)
        vs = paired_difference(sid_runs(rng, difficulty + 0.05), sid_runs(rng, difficulty), resamples=400, seed=draw)
        covered_diff += vs["ci95"][0] <= 0.05 <= vs["ci95"][1]
    low, high = tolerance(draws, 0.95)
    assert low <= covered_per <= high and low <= covered_diff <= high


def test_seeds_are_resampled_and_paired_by_index():
    """Runs that differ by seed widen the interval (the seed level); a system paired seed by seed with the base
    that fixes the same utterances in every seed is a clear difference, which unpaired seeds would blur."""
    rng = np.random.default_rng(5)
    n = 3000
    ids = tuple(f"u{i:05d}" for i in range(n))
    runs = [(rng.random(n) < rate).astype(np.int64) for rate in (0.6, 0.7, 0.8)]
    ones = np.ones(n, np.int64)
    base = Runs.of([UtteranceScores("SID", ids, r, ones) for r in runs])
    ci = confidence_interval(base)
    assert ci["test_runs"] == pytest.approx([r.mean() for r in runs]) and len(ci["test_runs"]) == 3
    assert ci["test_mean"] == pytest.approx(np.mean(ci["test_runs"]))
    half = (ci["test_ci95"][1] - ci["test_ci95"][0]) / 2
    assert half > 0.04  # the seeds' spread; utterances alone give about 0.01
    single = confidence_interval(Runs.of([UtteranceScores("SID", ids, runs[1], ones)]))["test_ci95"]
    assert (single[1] - single[0]) / 2 < 0.02
    fixed = rng.choice(n, 60, replace=False)
    better = [r.copy() for r in runs]
    for r in better:
        r[fixed] = 1
    system = Runs.of([UtteranceScores("SID", ids, r, ones) for r in better])
    vs = paired_difference(system, base)
    assert statistics.excludes_zero(vs["ci95"]) and vs["p"] < 0.01
    assert vs["ci95"][1] - vs["ci95"][0] < 0.02


def test_one_utterance_draw_is_shared_by_the_seeds():
    """Seeds scored the same utterances (crossed, not nested): three identical runs are as uncertain as one.
    Drawing utterances separately per seed would shrink the interval by about sqrt(3)."""
    rng = np.random.default_rng(9)
    one = pr_runs(rng, rng.integers(5, 60, 1500), rng.beta(2, 18, 1500))
    three = Runs(one.task, one.ids, np.repeat(one.numerator, 3, 0), np.repeat(one.denominator, 3, 0))
    width = [np.diff(confidence_interval(r)["test_ci95"])[0] for r in (one, three)]
    assert width[1] == pytest.approx(width[0], rel=0.15)


def test_utterance_ids_must_match_and_results_are_reproducible():
    rng = np.random.default_rng(6)
    base = sid_runs(rng, np.full(100, 0.7))
    other = Runs("SID", base.ids[:-2] + ("x1", "x2", "x3"), np.zeros((1, 101)), np.ones((1, 101)))
    with pytest.raises(StatisticsError, match=r"3 only in the system, 2 only in the base"):
        paired_difference(other, base)
    fields = task_statistics({"base": base, "odd": other}, "base")
    assert fields["odd"]["vs_base"] is None and "3 only in the system" in fields["odd"]["stats_note"]
    assert fields["odd"]["test_ci95"] is not None and fields["base"]["vs_base"] is None
    assert confidence_interval(base) == confidence_interval(base)
    one, two = statistics.replicates([base], 200, seed=1), statistics.replicates([base], 200, seed=2)
    assert np.array_equal(one[0], statistics.replicates([base], 200, seed=1)[0]) and not np.array_equal(one[0], two[0])
    # A system's interval does not depend on which other systems share the pass.
    system = sid_runs(rng, np.full(100, 0.8))
    together = task_statistics({"base": base, "s": system}, "base")
    assert together["base"]["test_ci95"] == confidence_interval(base)["test_ci95"]
    assert together["s"]["vs_base"] == paired_difference(system, base)


def test_full_scale_is_fast():
    """LibriSpeech test-clean (2620) and VoxCeleb1 test (4874), 3 seeds, B = 2000: a base and a system in seconds."""
    import time

    rng = np.random.default_rng(7)
    lengths = rng.integers(10, 300, 2620)
    started = time.perf_counter()
    pr = task_statistics({"base": pr_runs(rng, lengths, np.full(2620, 0.06), 3),
                          "s": pr_runs(rng, lengths, np.full(2620, 0.07), 3)}, "base")
    sid = task_statistics({"base": sid_runs(rng, np.full(4874, 0.8), 3), "s": sid_runs(rng, np.full(4874, 0.7), 3)},
                          "base")
    assert time.perf_counter() - started < 20  # about 1 s on 2 busy cores
    assert pr["s"]["vs_base"]["p"] < 0.01 and sid["s"]["vs_base"]["ci95"][1] < 0


# ------------------------------------------------------------------ the report
def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _model(root: Path, model: str, method: str, rate: float | None, macs: int) -> None:
    _write_json(root / "models" / model / "model.json", {"model": model, "method": method, "rate": rate})
    _write_json(root / "models" / model / "profile.json",
                {"params": macs // 1000, "macs": macs, "macs_effective": macs, "seconds_audio": 10.0,
                 "median_seconds": macs / 1e11, "rtf": macs / 1e12, "device": "cpu"})


def _result(root: Path, task: str, model: str, test: float) -> Path:
    folder = root / "downstream" / f"{task.lower()}_{model}"
    _write_json(folder / "result.json", {"task": task, "model": model, "metric": {"PR": "per", "SID": "acc"}[task],
                                         "test": test, "dev_best": test, "lr": 1e-2, "steps": 10})
    return folder


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, s3prl_experts) -> Path:
    """A base and three compressed models; per-utterance files written by S3PRL's own experts.

    PR: h_half much worse than the base, h_quarter the base with one utterance changed (no clear
    difference), lowrank without per-utterance files (an old run). SID: the base; h_quarter much
    worse; h_half scored on other utterances than the base.
    """
    root = tmp_path_factory.mktemp("stats") / "exp"
    rng = np.random.default_rng(8)
    ids, hyps, refs = random_transcripts(rng, 200, 0.1)
    worse = corrupt(rng, refs, 0.4)  # the same references, more errors
    quarter = [*hyps]
    quarter[5] = refs[5]
    for model, method, rate, macs in (("hubert", "base", None, 60 * 10**9), ("h_half", "head_pruning", 0.5, 40 * 10**9),
                                      ("h_quarter", "head_pruning", 0.25, 50 * 10**9),
                                      ("lowrank", "low_rank", 0.5, 45 * 10**9)):
        _model(root, model, method, rate, macs)
    for model, hypotheses in (("hubert", hyps), ("h_half", worse), ("h_quarter", quarter)):
        folder = _result(root, "PR", model, 0.0)
        printed = s3prl_pr(s3prl_experts, folder, ids, hypotheses, refs)
        _result(root, "PR", model, printed)  # result.json holds what S3PRL printed
    _result(root, "PR", "lowrank", 0.2)
    truth = [int(t) for t in rng.integers(0, 1251, 400)]
    sid_ids = [f"id1{t + 1:04d}-v-{i:05d}" for i, t in enumerate(truth)]
    for model, rate, names in (("hubert", 0.8, sid_ids), ("h_quarter", 0.6, sid_ids),
                               ("h_half", 0.8, [f"{n}x" for n in sid_ids])):
        predicted = [t if rng.random() < rate else (t + 1) % 1251 for t in truth]
        folder = _result(root, "SID", model, 0.0)
        _result(root, "SID", model, s3prl_sid(s3prl_experts, folder, names, predicted, truth))
    return root


def test_the_report_gets_intervals_and_differences(experiment, capsys):
    from upstream_compressed.cli import main

    assert main(["report", str(experiment)]) == 0
    assert capsys.readouterr().err == ""
    merged = json.loads((experiment / "report.json").read_text())
    rows = {row["model"]: row for row in merged["rows"]}
    assert merged["statistics"]["resamples"] == statistics.RESAMPLES and "bootstrap" in merged["statistics"]["method"]

    base = rows["hubert"]["PR"]
    assert base["test_runs"] == [base["test"]] and base["test_mean"] == base["test"]  # one seed today
    assert base["test_ci95"][0] < base["test"] < base["test_ci95"][1] and base["vs_base"] is None
    assert base["stats_note"] is None and base["dev_best"] is not None  # the old fields stay
    half = rows["h_half"]["PR"]["vs_base"]
    assert half["diff"] == pytest.approx(rows["h_half"]["PR"]["test"] - base["test"]) and half["diff"] > 0.1
    assert half["ci95"][0] > 0 and half["p"] < 0.01
    quarter = rows["h_quarter"]["PR"]["vs_base"]
    assert quarter["diff"] < 0 and quarter["ci95"][0] <= 0 <= quarter["ci95"][1] and quarter["p"] > 0.05
    lowrank = rows["lowrank"]["PR"]
    assert lowrank["test"] == 0.2 and lowrank["test_ci95"] is None and lowrank["vs_base"] is None
    assert "no test-hyp.ark or test-ref.ark" in lowrank["stats_note"]
    sid = rows["h_quarter"]["SID"]
    assert sid["test_runs"] == [pytest.approx(sid["test"], abs=1e-6)]
    assert sid["vs_base"]["ci95"][1] < 0 and sid["vs_base"]["p"] < 0.01
    mismatch = rows["h_half"]["SID"]
    assert mismatch["test_ci95"] is not None and mismatch["vs_base"] is None
    assert "400 only in the system, 400 only in the base" in mismatch["stats_note"]

    markdown = (experiment / "report.md").read_text()
    cell = f"{100 * rows['h_half']['PR']['test_mean']:.2f} ± "
    assert re.search(rf"\| {re.escape(cell)}\d+\.\d\d\* \|", markdown)  # clear difference: marked
    interval = r"\d+\.\d\d ± \d+\.\d\d"  # h_quarter: PR no clear difference, SID a clear one
    assert re.search(rf"\| head_pruning \| 0.25 \| h_quarter \|[^\n]*\| {interval} \| {interval}\* \|", markdown)
    assert "| low_rank | 0.5 | lowrank |" in markdown and "| 20.00 |" in markdown  # no interval: the old cell
    assert "| h_half | PR | 1 |" in markdown and "lowrank PR: no per-utterance scores" in markdown

    import csv  # the CSV keeps numbers in its cells: the interval's ends get columns of their own

    table = {row["model"]: row for row in csv.DictReader((experiment / "report.csv").open())}
    low, high = rows["h_half"]["PR"]["test_ci95"]
    assert float(table["h_half"]["PER %"]) == pytest.approx(100 * rows["h_half"]["PR"]["test"], abs=0.005)
    assert (float(table["h_half"]["PER 95% low"]), float(table["h_half"]["PER 95% high"])) == pytest.approx(
        (100 * low, 100 * high), abs=0.005)
    assert table["lowrank"]["PER 95% low"] == ""


def test_the_plots_draw_the_intervals_as_error_bars(experiment):
    from upstream_compressed.report import figures, load_report

    report = load_report(experiment)
    (axes,) = figures(report)["per_vs_macs"].axes
    bars = [segment for collection in axes.collections for segment in collection.get_segments()]
    rows = {row["model"]: row for row in report.rows}
    expected = {(rows[m]["profile"]["macs_effective"] / 1e9, 100 * rows[m]["PR"]["test_ci95"][0],
                 100 * rows[m]["PR"]["test_ci95"][1]) for m in ("hubert", "h_half", "h_quarter")}
    drawn = sorted((s[0][0], min(s[0][1], s[1][1]), max(s[0][1], s[1][1])) for s in bars)
    assert len(bars) == 3
    assert [v for bar in drawn for v in bar] == pytest.approx([v for bar in sorted(expected) for v in bar])


def test_files_that_disagree_with_result_json_get_a_note_not_a_crash(experiment, tmp_path):
    import shutil

    from upstream_compressed.report import load_report

    root = tmp_path / "exp"
    shutil.copytree(experiment, root)
    _result(root, "PR", "h_quarter", 0.5)  # another evaluation's score
    (root / "downstream" / "sid_hubert" / "test_predict.txt").unlink()  # the base lacks its files: no vs_base
    rows = {row["model"]: row for row in load_report(root, resamples=200).rows}
    note = rows["h_quarter"]["PR"]["stats_note"]
    assert "give test per" in note and "result.json holds 0.5" in note and rows["h_quarter"]["PR"]["test_ci95"] is None
    assert rows["h_half"]["PR"]["vs_base"] is not None
    assert rows["h_quarter"]["SID"]["vs_base"] is None and rows["h_quarter"]["SID"]["test_ci95"] is not None
    assert "the base hubert has no per-utterance scores" in rows["h_quarter"]["SID"]["stats_note"]
