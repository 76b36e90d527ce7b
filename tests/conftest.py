"""Shared fixtures: tiny real-format checkpoints built with S3PRL's own model classes."""

from __future__ import annotations

import pytest
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
