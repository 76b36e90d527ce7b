"""Per-utterance test scores from S3PRL's own output files, and bootstrap intervals over seeds and utterances.

Scores. S3PRL's ``-m evaluate`` writes, beside its checkpoint:

- PR (``-d ctc``): ``test-hyp.ark`` and ``test-ref.ark``, lines ``<utterance id> <phones>``. Per
  utterance: errors = the edit distance of ``hyp.split(" ")`` to ``ref.split(" ")`` and length =
  ``len(ref.split(" "))``, exactly as ``s3prl/downstream/ctc/metric.py: wer`` (which ``per`` calls)
  splits them (so an empty hypothesis is one empty token, as there).
- SID (``-d voxceleb1``): ``test_predict.txt`` and ``test_truth.txt``, lines ``<utterance id> id1xxxx``.
  Per utterance: correct = 1 if the predicted speaker equals the true one, else 0.

Both are held as a ratio per utterance, numerator / denominator (errors / length; correct / 1), so one
aggregation serves both: score = sum of numerators / sum of denominators. For PR that is S3PRL's PER
(summed errors over summed lengths, not a mean of per-utterance rates); for SID it is accuracy.

Several runs (one per downstream seed) of one system form a ``Runs``: a (runs x utterances) table over
the same utterances in the same order. A run's score is its ratio; ``test_runs`` lists them and
``test_mean`` is their mean (with one run: that run's score).

Bootstrap (two-level, crossed; "pigeonhole" bootstrap, Owen 2007). Every seed scored the *same*
utterances, so seeds and utterances are crossed factors, not nested. Each of ``resamples`` replicates:

1. draws R seeds with replacement from the R runs (with one run: that run every time), then
2. draws N utterances with replacement from the N utterances, *one draw shared by all the chosen seeds*
   (they scored the same utterances; drawing separately per seed would treat the utterance effect as
   independent noise and understate it),

and computes the replicate's statistic as the pooled ratio over the chosen seeds and utterances
(sum of numerators / sum of denominators, each seed counted as often as it was drawn). Because every
seed has the same references, this equals the mean over the chosen seeds of their ratio on the drawn
utterances, the same estimator as ``test_mean``.

- ``test_ci95``: the 2.5% and 97.5% percentiles of the replicates (percentile interval).
- ``vs_base`` = ``{diff, ci95, p}``: ``diff`` = system's ``test_mean`` - base's ``test_mean`` (in the
  metric's units: positive PER diff = more errors, positive accuracy diff = better). Paired bootstrap:
  each replicate uses the *same* utterance draw for system and base (utterance ids must match; they
  are aligned by id), and the same seed draw (seed i of the system paired with seed i of the base)
  when both have the same number of runs; with different numbers of runs the seeds are drawn
  independently for each. ``ci95`` is the percentile interval of the replicate differences; ``p`` is
  the two-sided percentile-inversion p-value, ``min(1, 2 * min(#{d* <= 0} + 1, #{d* >= 0} + 1) / (B + 1))``:
  about the smallest level at which the percentile interval excludes 0, so ``p < 0.05`` agrees with
  ``ci95`` excluding 0, and under equal systems it is about uniform (tests/test_statistics.py checks).

With few seeds (2-3) the seed level of the bootstrap understates the seed variance (resampling R values
has variance (R-1)/R of theirs, and few distinct draws); say so beside intervals from few seeds.

Everything is numpy: replicates are computed in blocks as count-weighted sums (a (block x N) matrix of
utterance counts times the (R x N) score table), from one ``numpy.random.Generator`` with a fixed seed,
so a report is reproducible; all systems of a task share one pass (``task_statistics``). Measured at
full scale (LibriSpeech test-clean 2620 utterances, VoxCeleb1 test 4874; 3 seeds; B = 2000) on a
2-core AMD EPYC shared with another job: one interval 0.4 s (PR) / 0.65 s (SID); all fields of 10
models on one task 0.25 s (PR) / 0.65 s (SID); the cost is mostly drawing the utterance counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RESAMPLES = 2000  # bootstrap replicates
SEED = 19  # fixed: the same experiment folder always gives the same intervals
LEVEL = 0.95
BLOCK = 256  # replicates per block (memory: BLOCK x N float64); the draws do not depend on it

# The files S3PRL's evaluate writes in its expdir, by task: (output, reference)
FILES = {"PR": ("test-hyp.ark", "test-ref.ark"), "SID": ("test_predict.txt", "test_truth.txt")}
METHOD = ("two-level (crossed) percentile bootstrap: each replicate resamples seeds with replacement, then "
          "utterances with replacement (one draw shared by the chosen seeds and, for vs_base, by system and base; "
          "seeds paired by index when both have as many); statistic = pooled ratio (PER: summed errors / summed "
          "reference lengths; accuracy: mean correct); p two-sided by percentile inversion")


class StatisticsError(ValueError):
    """Per-utterance files that cannot be scored or compared; the message names the file or the mismatch."""


@dataclass(frozen=True)
class UtteranceScores:
    """One run of one system on one task: per utterance a numerator and a denominator, sorted by id."""

    task: str  # PR | SID
    ids: tuple[str, ...]
    numerator: np.ndarray  # int64: phone errors (PR) or correct 0/1 (SID)
    denominator: np.ndarray  # int64: reference length in phones (PR) or 1 (SID)

    @property
    def score(self) -> float:
        return aggregate(self.numerator, self.denominator)


def aggregate(numerator: np.ndarray, denominator: np.ndarray) -> float:
    """PER = summed errors / summed lengths (S3PRL's); accuracy = mean of correct (denominators 1)."""
    return int(np.sum(numerator)) / int(np.sum(denominator))  # Python ints: exact sums, one rounding


def _pairs(path: Path) -> dict[str, str]:
    """``<id> <rest of line>`` lines as S3PRL writes them (``f"{name} {text}\\n"``); refuses duplicates."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise StatisticsError(f"{path}: not readable ({error})") from error
    except UnicodeDecodeError as error:
        raise StatisticsError(f"{path}: not UTF-8 text ({error})") from error
    if not text:
        raise StatisticsError(f"{path} is empty: the evaluation wrote no utterance")
    if not text.endswith("\n"):
        raise StatisticsError(f"{path} does not end with a newline: the evaluation was cut off; run it again")
    pairs: dict[str, str] = {}
    for number, line in enumerate(text[:-1].split("\n"), start=1):  # "\n" only, as written: not splitlines()
        key, separator, value = line.partition(" ")
        if not key or not separator:
            raise StatisticsError(f"{path}:{number}: expected `<utterance id> <text>`, got {line!r}")
        if key in pairs:
            raise StatisticsError(f"{path}:{number}: utterance {key} appears twice")
        pairs[key] = value
    return pairs


def _matched(output: Path, reference: Path) -> tuple[dict[str, str], dict[str, str], list[str]]:
    out, ref = _pairs(output), _pairs(reference)
    only_out, only_ref = out.keys() - ref.keys(), ref.keys() - out.keys()
    if only_out or only_ref:
        example = sorted(only_out | only_ref)[:3]
        raise StatisticsError(f"{output} and {reference} list different utterances: {len(only_out)} only in the "
                              f"first, {len(only_ref)} only in the second (e.g. {example}); the evaluation did not "
                              "finish or the files come from different runs; run it again")
    return out, ref, sorted(ref)


def read_pr_scores(hyp: str | Path, ref: str | Path) -> UtteranceScores:
    """Per utterance phone errors and reference length from S3PRL's ``test-hyp.ark`` / ``test-ref.ark``."""
    import editdistance  # what s3prl's ctc metric uses

    hyps, refs, ids = _matched(Path(hyp), Path(ref))
    errors = np.fromiter((editdistance.eval(hyps[k].split(" "), refs[k].split(" ")) for k in ids), np.int64, len(ids))
    lengths = np.fromiter((len(refs[k].split(" ")) for k in ids), np.int64, len(ids))
    return UtteranceScores("PR", tuple(ids), errors, lengths)


def read_sid_scores(predict: str | Path, truth: str | Path) -> UtteranceScores:
    """Per utterance correct (1) or not (0) from S3PRL's ``test_predict.txt`` / ``test_truth.txt``."""
    predicted, true, ids = _matched(Path(predict), Path(truth))
    correct = np.fromiter((predicted[k] == true[k] for k in ids), np.int64, len(ids))
    return UtteranceScores("SID", tuple(ids), correct, np.ones(len(ids), np.int64))


def read_run(folder: str | Path, task: str) -> UtteranceScores:
    """The per-utterance scores of the test evaluation S3PRL wrote into one expdir ``folder``."""
    folder = Path(folder)
    if task not in FILES:
        raise StatisticsError(f"unknown task {task!r}; expected one of {', '.join(FILES)}")
    output, reference = (folder / name for name in FILES[task])
    missing = [p.name for p in (output, reference) if not p.is_file()]
    if missing:
        raise StatisticsError(f"{folder}: no {' or '.join(missing)} (S3PRL's per-utterance test output); "
                              "evaluate it again with this version's run_downstream to get intervals")
    return (read_pr_scores if task == "PR" else read_sid_scores)(output, reference)


def _mismatch(a: Sequence[str], b: Sequence[str], what_a: str, what_b: str) -> str | None:
    if tuple(a) == tuple(b):
        return None
    only_a, only_b = set(a) - set(b), set(b) - set(a)
    example = sorted(only_a | only_b)[:3]
    return (f"utterance ids differ between {what_a} ({len(a)}) and {what_b} ({len(b)}): {len(only_a)} only in "
            f"{what_a}, {len(only_b)} only in {what_b} (e.g. {example}); compare runs on the same test set")


@dataclass(frozen=True)
class Runs:
    """Several runs (seeds) of one system on one task over the same utterances: (R x N) tables."""

    task: str
    ids: tuple[str, ...]
    numerator: np.ndarray  # (R, N) float64
    denominator: np.ndarray  # (R, N) float64

    @classmethod
    def of(cls, runs: Sequence[UtteranceScores]) -> Runs:
        if not runs:
            raise StatisticsError("no runs to score")
        first = runs[0]
        for index, run in enumerate(runs[1:], start=1):
            if run.task != first.task:
                raise StatisticsError(f"run {index} is {run.task}, run 0 is {first.task}")
            problem = _mismatch(first.ids, run.ids, "run 0", f"run {index}")
            if problem:
                raise StatisticsError(problem)
        return cls(first.task, first.ids, np.stack([r.numerator for r in runs]).astype(np.float64),
                   np.stack([r.denominator for r in runs]).astype(np.float64))

    @property
    def scores(self) -> list[float]:
        """One score per run (seed), each S3PRL's aggregate over the utterances."""
        return [aggregate(n.astype(np.int64), d.astype(np.int64)) for n, d in zip(self.numerator, self.denominator)]


def _counts(rng: np.random.Generator, size: int, rows: int) -> np.ndarray:
    """(rows x size) multiplicities of ``size`` draws with replacement from ``size`` items, per row."""
    if size == 1:
        return np.ones((rows, 1))
    draws = rng.integers(0, size, (rows, size)) + (np.arange(rows) * size)[:, None]
    return np.bincount(draws.ravel(), minlength=rows * size).reshape(rows, size).astype(np.float64)


def replicates(systems: Sequence[Runs], resamples: int = RESAMPLES, seed: int = SEED) -> list[np.ndarray]:
    """Bootstrap replicates of each system's pooled ratio, all on the same draws (see the module's note).

    The utterance draws come from one generator, shared by every system; the seed draws from one
    generator per number of runs R, so systems with equal R share them (paired by seed index). Each
    system's replicates therefore depend only on its own table, ``resamples`` and ``seed``, not on
    which other systems are in the call.
    """
    if not systems:
        return []
    n = len(systems[0].ids)
    for system in systems[1:]:
        problem = _mismatch(systems[0].ids, system.ids, "the first system", "another system")
        if problem:
            raise StatisticsError(problem)
    utterance_rng = np.random.default_rng([seed, 0])
    seed_rngs = {r: np.random.default_rng([seed, 1, r]) for r in sorted({len(s.numerator) for s in systems})}
    # One matrix of every run's numerators and denominators: one product per block for all systems.
    table = np.concatenate([np.concatenate([s.numerator, s.denominator]) for s in systems]).T  # (N, 2 * sum R)
    table = np.ascontiguousarray(table)
    out = [np.empty(resamples) for _ in systems]
    for start in range(0, resamples, BLOCK):
        rows = min(BLOCK, resamples - start)
        seed_counts = {r: _counts(rng, r, rows) for r, rng in seed_rngs.items()}  # (rows, R) each
        sums = _counts(utterance_rng, n, rows) @ table  # (rows, 2 * sum R): per run, sums over the drawn utterances
        column = 0
        for index, system in enumerate(systems):
            r = len(system.numerator)
            errors, lengths = sums[:, column:column + r], sums[:, column + r:column + 2 * r]
            column += 2 * r
            seeds = seed_counts[r]
            out[index][start:start + rows] = (seeds * errors).sum(1) / (seeds * lengths).sum(1)
    return out


def _interval(values: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return [float(low), float(high)]


def confidence_interval(runs: Runs, *, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict:
    """``test_runs``, ``test_mean`` and ``test_ci95`` of one system (see the module's note for the bootstrap)."""
    (values,) = replicates([runs], resamples, seed)
    return summary(runs, values, level)


def summary(runs: Runs, values: np.ndarray, level: float = LEVEL) -> dict:
    """``test_runs``, ``test_mean``, ``test_ci95`` from a system's table and its bootstrap replicates."""
    scores = runs.scores
    return {"test_runs": scores, "test_mean": float(np.mean(scores)), "test_ci95": _interval(values, level)}


def _comparable(system: Runs, base: Runs) -> None:
    if system.task != base.task:
        raise StatisticsError(f"cannot compare {system.task} with {base.task}")
    problem = _mismatch(system.ids, base.ids, "the system", "the base")
    if problem:
        raise StatisticsError(problem)


def paired_difference(system: Runs, base: Runs, *, resamples: int = RESAMPLES, seed: int = SEED,
                      level: float = LEVEL) -> dict:
    """``{diff, ci95, p}`` of system - base by a paired bootstrap over the same utterances (and seeds)."""
    _comparable(system, base)
    ours, theirs = replicates([system, base], resamples, seed)
    return difference(system, base, ours, theirs, level)


def difference(system: Runs, base: Runs, ours: np.ndarray, theirs: np.ndarray, level: float = LEVEL) -> dict:
    """``{diff, ci95, p}`` from both systems' replicates on the same draws (from one ``replicates`` call)."""
    _comparable(system, base)
    differences = ours - theirs
    resamples = len(differences)
    below, above = int(np.sum(differences <= 0)), int(np.sum(differences >= 0))
    p = min(1.0, 2 * (min(below, above) + 1) / (resamples + 1))
    diff = float(np.mean(system.scores) - np.mean(base.scores))
    return {"diff": diff, "ci95": _interval(differences, level), "p": p}


def excludes_zero(interval: Sequence[float] | None) -> bool:
    return interval is not None and (interval[0] > 0 or interval[1] < 0)


def empty_fields(note: str | None = None) -> dict[str, Any]:
    """The statistics fields of a task entry that has none (missing files, mismatched ids)."""
    return {"test_runs": None, "test_mean": None, "test_ci95": None, "vs_base": None, "stats_note": note}


def task_statistics(systems: dict[str, Runs], base: str | None, *, resamples: int = RESAMPLES, seed: int = SEED,
                    level: float = LEVEL) -> dict[str, dict[str, Any]]:
    """The statistics fields of every system on one task, and ``vs_base`` against ``systems[base]``.

    Systems are bootstrapped together on shared draws (one pass per set of utterance ids), so each
    ``vs_base`` is paired; a system whose utterance ids differ from the base's gets its own interval,
    ``vs_base`` null and a ``stats_note`` naming the mismatch.
    """
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, runs in systems.items():
        groups.setdefault(runs.ids, []).append(name)
    values: dict[str, np.ndarray] = {}
    for names in groups.values():
        values.update(zip(names, replicates([systems[n] for n in names], resamples, seed)))
    fields = {}
    for name, runs in systems.items():
        entry = {**summary(runs, values[name], level), "vs_base": None, "stats_note": None}
        if base is not None and name != base and base in systems:
            try:
                entry["vs_base"] = difference(runs, systems[base], values[name], values[base], level)
            except StatisticsError as error:
                entry["stats_note"] = f"no vs_base: {error}"
        fields[name] = entry
    return fields
