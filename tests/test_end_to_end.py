"""S3PRL's unchanged ``run_downstream`` trains and evaluates SUPERB PR and SID on CPU.

Each case runs ``python -m upstream_compressed.run_downstream`` twice in a subprocess, exactly as
a user would: ``-m train`` for a few steps on the tiny corpus, then ``-m evaluate -e
states-N.ckpt`` on its test split. The printed PER / accuracy must be a finite number in range
and agree with the hypotheses S3PRL wrote beside it.

To add an upstream, append an ``Upstream`` to ``UPSTREAMS``: its ``-u`` name and a function
that writes what ``-k`` gets into a folder (e.g. a delta file) and returns its path. The cases
run side by side (one per core) in a module fixture, since each process is mostly S3PRL imports.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import editdistance
import pytest
import yaml

from upstream_compressed.testing.checkpoints import make_distiller_checkpoint, make_hubert_checkpoint
from upstream_compressed.testing.corpus import TinyCorpus, make_tiny_corpus

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "downstream_configs"
RUN_TIMEOUT_S = 300


@dataclass(frozen=True)
class Upstream:
    name: str  # -u
    make_ckpt: Callable[[Path], Path]  # writes the -k file into the given folder

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Task:
    downstream: str  # -d
    config: str  # -c, in downstream_configs/
    override: Callable[[TinyCorpus], str]  # -o: point the config at the tiny corpus
    metric: str  # what evaluate prints as "test <metric>: <value>"

    def __str__(self) -> str:
        return self.downstream


def make_delta(base: Path, steps: list[dict]) -> Path:
    """Compress ``base`` by ``steps`` with the real CLI; the delta lands beside the base."""
    from upstream_compressed.cli import main as cli_main

    recipe = base.with_suffix(".yaml")
    recipe.write_text(yaml.safe_dump({"base": str(base), "steps": steps}))
    delta = base.with_suffix(".safetensors")
    assert cli_main(["compress", str(recipe), "-o", str(delta)]) == 0
    return delta


def kd_head_lr_delta(folder: Path) -> Path:
    """The combination (a few distillation steps on generated audio, then head pruning and low-rank)."""
    import numpy as np
    import soundfile

    audio = folder / "audio"
    audio.mkdir()
    for i in range(4):
        t = np.arange(12000) / 16000
        soundfile.write(audio / f"{i}.wav", (0.3 * np.sin(2 * np.pi * (150 + 50 * i) * t)).astype(np.float32), 16000)
    kd = {"method": "distillation", "student_layers": 1, "pred_layers": [1, 2], "audio": str(audio), "steps": 2,
          "batch_size": 2, "max_seconds": 0.75, "device": "cpu"}
    steps = [kd, {"method": "head_pruning", "ratio": 0.5}, {"method": "low_rank", "ratio": 0.5, "targets": ["ffn"]}]
    return make_delta(make_hubert_checkpoint(folder / "tiny_hubert.pt"), steps)


UPSTREAMS = [
    Upstream("hubert_identity", lambda folder: make_delta(make_hubert_checkpoint(folder / "tiny_hubert.pt"), [])),
    Upstream(
        "distilhubert_identity",
        lambda folder: make_delta(make_distiller_checkpoint(folder / "tiny_distiller.ckpt"), []),
    ),
    Upstream(
        "hubert_headpruned",
        lambda folder: make_delta(
            make_hubert_checkpoint(folder / "tiny_hubert.pt"), [{"method": "head_pruning", "ratio": 0.5}]
        ),
    ),
    Upstream("hubert_kd_head_lr", kd_head_lr_delta),
]

PR = Task("ctc", "ctc_libriphone_tiny.yaml", TinyCorpus.ctc_override, "per")
SID = Task("voxceleb1", "voxceleb1_tiny.yaml", TinyCorpus.voxceleb1_override, "acc")


@dataclass(frozen=True)
class Case:
    upstream: Upstream
    task: Task


CASES = [Case(u, t) for u in UPSTREAMS for t in (PR, SID)]


@dataclass(frozen=True)
class Outcome:
    expdir: Path
    train_output: str
    evaluate_output: str


def run_downstream(args: list[str], cwd: Path) -> str:
    """One ``run_downstream`` process; returns its output, raises with the tail of it on error."""
    env = dict(os.environ)
    # Keep voxceleb1's file-list cache out of site-packages (see s3prl_compat).
    env["UPSTREAM_COMPRESSED_VOXCELEB1_CACHE"] = str(cwd / "voxceleb1_cache")
    env["OMP_NUM_THREADS"] = "1"  # cases run side by side, one core each
    result = subprocess.run(
        [sys.executable, "-m", "upstream_compressed.run_downstream", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(f"run_downstream {' '.join(args)} failed:\n{output[-6000:]}")
    return output


def train_then_evaluate(case: Case, ckpt: Path, corpus: TinyCorpus, workdir: Path) -> Outcome:
    """What a user types: train a few steps, then evaluate the last checkpoint on test."""
    expdir = workdir / "exp"
    train = run_downstream(
        ["-m", "train", "--device", "cpu", "-u", case.upstream.name, "-k", str(ckpt),
         "-d", case.task.downstream, "-c", str(CONFIGS / case.task.config), "-p", str(expdir),
         "-o", case.task.override(corpus)],
        cwd=workdir,
    )
    steps = yaml.safe_load((CONFIGS / case.task.config).read_text())["runner"]["total_steps"]
    states = expdir / f"states-{steps}.ckpt"  # the last checkpoint (save_step divides total_steps)
    if not states.is_file():
        raise AssertionError(f"no {states.name} after training; {sorted(p.name for p in expdir.iterdir())}")
    evaluate = run_downstream(["-m", "evaluate", "--device", "cpu", "-e", str(states)], cwd=workdir)
    return Outcome(expdir, train, evaluate)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> TinyCorpus:
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"))


def run_cases(cases: list[Case], tmp_path_factory, corpus: TinyCorpus) -> dict[Case, Future]:
    """Every case, run side by side on the available cores (each process is mostly imports)."""
    jobs = []
    for case in cases:
        workdir = tmp_path_factory.mktemp(f"{case.upstream}-{case.task}")
        jobs.append((case, case.upstream.make_ckpt(workdir), workdir))  # here: seeded, one at a time
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        futures = {case: pool.submit(train_then_evaluate, case, ckpt, corpus, workdir)
                   for case, ckpt, workdir in jobs}
        wait(futures.values())
    return futures


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, corpus) -> dict[Case, Future]:
    return run_cases(CASES, tmp_path_factory, corpus)


def printed_metric(output: str, split: str, metric: str) -> float:
    """The value of S3PRL's ``<split> <metric>: <value>`` line (the last one printed)."""
    values = re.findall(rf"^{split} {metric}: (\S+)$", output, flags=re.MULTILINE)
    assert values, f"no '{split} {metric}:' line in the output:\n{output[-3000:]}"
    value = float(values[-1])
    assert math.isfinite(value), f"{split} {metric} is {value}"
    return value


def _two_columns(path: Path) -> dict[str, str]:
    """``name rest-of-line`` files that S3PRL writes beside an evaluation."""
    pairs = (line.rstrip("\n").partition(" ") for line in path.read_text().splitlines(keepends=True))
    return {name: rest for name, _, rest in pairs}


def check_per(expdir: Path, per: float, utterances: int) -> None:
    """PER >= 0, and equal to the edit distance of the hypotheses S3PRL wrote (as s3prl's metric splits them)."""
    hyp, ref = _two_columns(expdir / "test-hyp.ark"), _two_columns(expdir / "test-ref.ark")
    assert len(ref) == utterances and hyp.keys() == ref.keys()
    errors = sum(editdistance.eval(hyp[k].split(" "), ref[k].split(" ")) for k in ref)
    assert per >= 0.0
    assert per == pytest.approx(errors / sum(len(r.split(" ")) for r in ref.values()))


def check_accuracy(expdir: Path, accuracy: float, utterances: int) -> None:
    """Accuracy in [0, 1], and equal to the predictions S3PRL wrote."""
    predicted, truth = _two_columns(expdir / "test_predict.txt"), _two_columns(expdir / "test_truth.txt")
    assert len(truth) == utterances and predicted.keys() == truth.keys()
    assert 0.0 <= accuracy <= 1.0
    assert accuracy == pytest.approx(sum(predicted[k] == truth[k] for k in truth) / len(truth))


def check_outcome(case: Case, corpus: TinyCorpus, outcomes: dict[Case, Future]) -> None:
    """The run succeeded, and its printed metric is in range and agrees with what S3PRL wrote."""
    outcome: Outcome = outcomes[case].result()  # re-raises a failed run with its output
    printed_metric(outcome.train_output, "dev", case.task.metric)  # the in-training dev evaluation ran
    value = printed_metric(outcome.evaluate_output, "test", case.task.metric)
    if case.task.metric == "per":
        check_per(outcome.expdir, value, utterances=len(list((corpus.librispeech / "test-clean").rglob("*.flac"))))
    else:
        test_lines = [l for l in corpus.voxceleb1_split.read_text().splitlines() if l.startswith("3 ")]
        check_accuracy(outcome.expdir, value, utterances=len(test_lines))
    assert not (outcome.expdir.parent / "result").exists()  # every output went to -p


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.upstream}-{case.task}")
def test_train_then_evaluate(case: Case, corpus: TinyCorpus, outcomes: dict[Case, Future]):
    check_outcome(case, corpus, outcomes)


def _configured(name: str, override: str) -> dict:
    """A yaml of downstream_configs/ with ``-o`` applied by s3prl's own ``override``."""
    from s3prl.utility.helper import override as s3prl_override

    config = yaml.safe_load((CONFIGS / name).read_text())
    s3prl_override(override, argparse.Namespace(), config)
    return config


def test_full_scale_configs_build_their_downstream(tmp_path, monkeypatch, corpus):
    """The SUPERB-scale yamls hold the SUPERB hyper-parameters, and s3prl's experts accept them."""
    from upstream_compressed import s3prl_compat

    s3prl_compat.apply()
    from s3prl.downstream.ctc.expert import DownstreamExpert as CtcExpert
    from s3prl.downstream.voxceleb1.expert import DownstreamExpert as SidExpert

    monkeypatch.setenv("UPSTREAM_COMPRESSED_VOXCELEB1_CACHE", str(tmp_path / "cache"))
    pr = _configured("ctc_libriphone.yaml", corpus.ctc_override() + ",,config.downstream_expert.corpus.num_workers=0")
    assert (pr["optimizer"]["lr"], pr["runner"]["total_steps"], pr["downstream_expert"]["corpus"]["batch_size"]) \
        == (1.0e-2, 100000, 16)
    expert = CtcExpert(upstream_dim=16, upstream_rate=320, expdir=str(tmp_path), **pr)
    assert expert.tokenizer.vocab_size == 3 + 71
    wavs, labels, names = next(iter(expert.get_dataloader("dev")))
    assert len(wavs) == len(labels) == len(names) == 1

    sid = _configured("voxceleb1.yaml", corpus.voxceleb1_override())
    assert (sid["runner"]["total_steps"], sid["downstream_expert"]["datarc"]["max_timestep"]) == (200000, 128000)
    expert = SidExpert(upstream_dim=16, expdir=str(tmp_path), **sid)
    assert expert.train_dataset.speaker_num == 1251 and len(expert.test_dataset) == 8
