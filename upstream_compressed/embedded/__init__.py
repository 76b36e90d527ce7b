"""The embedded default: a synthetic English speech corpus and a tiny HuBERT pretrained on it.

- ``upstream-compressed make-corpus DIR``: espeak-ng speech in LibriSpeech and VoxCeleb1 layouts
  (:mod:`.synth_corpus`);
- ``upstream-compressed pretrain``: HuBERT's first iteration (MFCC k-means targets, masked
  prediction) for a small model, saved in S3PRL's converted HuBERT format (:mod:`.pretrain`);
- :func:`bundled_checkpoint`: the checkpoint shipped with the package (``-u hubert_tiny``).

Importing this package is cheap: no torch, no S3PRL, no espeak-ng.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).with_name("checkpoints")
BUNDLED = {"tiny_hubert": "tiny_hubert.pt"}


def bundled_checkpoint(name: str = "tiny_hubert") -> Path:
    """The path of a checkpoint bundled with the package, e.g. ``bundled_checkpoint("tiny_hubert")``."""
    if name not in BUNDLED:
        raise KeyError(f"no bundled checkpoint named {name!r}; known: {', '.join(sorted(BUNDLED))}")
    path = CHECKPOINT_DIR / BUNDLED[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled checkpoint {path} is missing: the package was installed without its package data "
            "(setup.py package_data must include embedded/checkpoints/*)"
        )
    return path
