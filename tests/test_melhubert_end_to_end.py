"""S3PRL's unchanged ``run_downstream`` trains and evaluates PR and SID on MelHuBERT upstreams.

A tiny checkpoint in MelHuBERT's own layout (with its mean/std file) runs as ``melhubert_local``,
and compressed by every technique: head pruning, row pruning, low-rank and distillation in one
combined delta (``melhubert_kd_head_row_lr``), weight pruning in its own (``melhubert_weightpruned``).
The machinery (train, evaluate, check the printed metric) is that of ``test_end_to_end``.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import soundfile

from test_end_to_end import PR, SID, Case, Upstream, check_outcome, corpus, make_delta, run_cases  # noqa: F401
from upstream_compressed.testing.checkpoints import make_melhubert_checkpoint
from upstream_compressed.testing.corpus import TinyCorpus


def _tones(folder: Path) -> str:
    audio = folder / "audio"
    audio.mkdir()
    for i in range(4):
        t = np.arange(12000) / 16000
        soundfile.write(audio / f"{i}.wav", (0.3 * np.sin(2 * np.pi * (150 + 50 * i) * t)).astype(np.float32), 16000)
    return str(audio)


def _base(folder: Path) -> Path:
    return make_melhubert_checkpoint(folder / "tiny_melhubert.ckpt")


def kd_head_row_lr_delta(folder: Path) -> Path:
    """Every structural technique in one delta: distillation, then head and row pruning, then low-rank."""
    kd = {"method": "distillation", "student_layers": 1, "pred_layers": [1, 2], "audio": _tones(folder), "steps": 2,
          "batch_size": 2, "max_seconds": 0.75, "device": "cpu"}
    steps = [kd, {"method": "head_pruning", "ratio": 0.5}, {"method": "row_pruning", "ratio": 0.5},
             {"method": "low_rank", "ratio": 0.5, "targets": ["attention"]}]
    return make_delta(_base(folder), steps)


UPSTREAMS = [
    Upstream("melhubert_local", _base),
    Upstream("melhubert_kd_head_row_lr", kd_head_row_lr_delta),
    Upstream("melhubert_weightpruned",
             lambda folder: make_delta(_base(folder), [{"method": "weight_pruning", "sparsity": 0.5}])),
]
CASES = [Case(u, t) for u in UPSTREAMS for t in (PR, SID)]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, corpus) -> dict[Case, Future]:  # noqa: F811
    return run_cases(CASES, tmp_path_factory, corpus)


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.upstream}-{case.task}")
def test_train_then_evaluate(case: Case, corpus: TinyCorpus, outcomes: dict[Case, Future]):  # noqa: F811
    check_outcome(case, corpus, outcomes)
