"""S3PRL's unchanged ``run_downstream`` trains and evaluates PR and SID on WavLM and wav2vec 2.0 deltas.

Tiny checkpoints in S3PRL's own WavLM and wav2vec 2.0 layouts (built with S3PRL's classes; the WavLM one
with its relative position bias and gate) are compressed by the real CLI into an identity delta and a
head-pruned one, and each runs through its named upstream (``wavlm_identity``, ``wavlm_headpruned``,
``wav2vec2_identity``, ``wav2vec2_headpruned``). The machinery (train, evaluate, check the printed
metric against the written predictions) is that of ``test_end_to_end``.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import pytest

from test_end_to_end import PR, SID, Case, Upstream, check_outcome, corpus, make_delta, run_cases  # noqa: F401
from upstream_compressed.testing.corpus import TinyCorpus
from upstream_compressed.testing.wav2vec2_checkpoints import make_wav2vec2_checkpoint
from upstream_compressed.testing.wavlm_checkpoints import make_wavlm_checkpoint

# Heads chosen per layer by l1 norm: different layers keep different original heads, so the WavLM delta
# exercises the per-layer selection of the shared relative position bias and of the gate.
HEADS = [{"method": "head_pruning", "ratio": 0.34}]


def _wavlm(folder: Path) -> Path:
    return make_wavlm_checkpoint(folder / "tiny_wavlm.pt")


def _wav2vec2(folder: Path) -> Path:
    return make_wav2vec2_checkpoint(folder / "tiny_wav2vec2.pt")


UPSTREAMS = [
    Upstream("wavlm_identity", lambda folder: make_delta(_wavlm(folder), [])),
    Upstream("wavlm_headpruned", lambda folder: make_delta(_wavlm(folder), HEADS)),
    Upstream("wav2vec2_identity", lambda folder: make_delta(_wav2vec2(folder), [])),
    Upstream("wav2vec2_headpruned", lambda folder: make_delta(_wav2vec2(folder), HEADS)),
]
CASES = [Case(u, t) for u in UPSTREAMS for t in (PR, SID)]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, corpus) -> dict[Case, Future]:  # noqa: F811
    return run_cases(CASES, tmp_path_factory, corpus)


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.upstream}-{case.task}")
def test_train_then_evaluate(case: Case, corpus: TinyCorpus, outcomes: dict[Case, Future]):  # noqa: F811
    check_outcome(case, corpus, outcomes)
