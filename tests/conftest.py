"""Shared fixtures: tiny real-format checkpoints built with S3PRL's own model classes."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

from upstream_compressed.testing.checkpoints import make_distiller_checkpoint, make_hubert_checkpoint


@pytest.fixture(scope="session")
def hubert_ckpt(tmp_path_factory):
    return make_hubert_checkpoint(tmp_path_factory.mktemp("hubert") / "tiny_hubert.pt")


@pytest.fixture(scope="session")
def distiller_ckpt(tmp_path_factory):
    return make_distiller_checkpoint(tmp_path_factory.mktemp("distiller") / "tiny_distiller.ckpt")


@pytest.fixture(scope="session")
def s3prl_hub():
    """``s3prl.hub`` with this plugin registered (importing it needs the compat shims)."""
    import upstream_compressed

    upstream_compressed.register()
    import s3prl.hub

    return s3prl.hub


@pytest.fixture
def padded_batch():
    """Three utterances of different lengths (1 s, 0.69 s, 0.31 s), so padding matters."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=generator) for n in (16000, 11000, 5003)]


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory):
    """Eight short tonal utterances (0.7-1.75 s, .wav and .flac) for data-driven scoring and training."""
    directory = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(1)
    for i in range(8):
        t = np.arange(int(16000 * (0.7 + 0.15 * i))) / 16000
        wav = 0.3 * np.sin(2 * np.pi * (100 + 30 * i) * t * (1 + 0.1 * np.sin(3 * t))) + 0.02 * rng.standard_normal(len(t))
        soundfile.write(directory / f"u{i}.{'flac' if i % 2 else 'wav'}", wav.astype(np.float32), 16000)
    return directory


@pytest.fixture(scope="session")
def long_audio_dir(tmp_path_factory):
    """33 utterances, two of them 8.5 s long: more files than 32 and longer than 8 s, so both of the
    data-driven criteria's defaults bite (a sample of 32 leaves out at most one of the long ones)."""
    directory = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(3)
    for i in range(33):
        seconds = 8.5 if i < 2 else 0.2 + 0.05 * (i % 5)
        wav = (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)
        soundfile.write(directory / f"u{i:02d}.wav", wav, 16000)
    return directory
