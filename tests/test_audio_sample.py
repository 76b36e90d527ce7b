"""Data-driven criteria score on a random sample of the whole corpus, not its first speaker's files."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from upstream_compressed.audio import list_audio, sample_audio
from upstream_compressed.compress import diagonality, importance


@pytest.fixture(scope="module")
def speakers(tmp_path_factory):
    """16 speakers x 8 utterances, LibriSpeech-style folders (speaker/chapter/file)."""
    root = tmp_path_factory.mktemp("speakers")
    wav = np.random.default_rng(0).uniform(-0.1, 0.1, 3200).astype(np.float32)
    for speaker in range(16):
        folder = root / str(100 + speaker) / "1"
        folder.mkdir(parents=True)
        for utt in range(8):
            soundfile.write(str(folder / f"{100 + speaker}-1-{utt:04d}.wav"), wav, 16000)
    return root


def _speakers_of(paths) -> set[str]:
    return {p.parts[-3] for p in paths}


def test_a_sample_is_spread_across_speakers_and_fixed_by_its_seed(speakers):
    sample = sample_audio(speakers, 16, seed=0)
    assert len(sample) == 16 and len(set(sample)) == 16
    assert len(_speakers_of(sample)) >= 8  # the first 16 sorted files would be 2 speakers
    assert sample == sample_audio(speakers, 16, seed=0)
    assert sample != sample_audio(speakers, 16, seed=1)
    assert sample == sorted(sample), "kept in corpus order, so batches are reproducible"
    assert sample_audio(speakers, 1000, seed=0) == list_audio(speakers)


@pytest.mark.parametrize("module, score", [
    (importance, lambda model, audio: importance.data_driven_scores(model, "heads", audio, max_utterances=8, seed=3)),
    (diagonality, lambda model, audio: diagonality.diagonality_scores(model, audio, max_utterances=8, seed=3)),
])
def test_data_driven_criteria_read_the_sample(speakers, hubert_ckpt, monkeypatch, module, score):
    from upstream_compressed.model import SpeechTransformer
    from upstream_compressed.model.convert import load_base

    base = load_base(hubert_ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    read = []
    real_load = module.load_audio
    monkeypatch.setattr(module, "load_audio", lambda path, *a, **k: read.append(path) or real_load(path, *a, **k))
    score(model, speakers)
    assert read == sample_audio(speakers, 8, seed=3)
    assert len(_speakers_of(read)) >= 4
