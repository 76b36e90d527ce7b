"""Small helpers shared by tests."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from upstream_compressed.model import SpeechTransformer


def run_model(model: SpeechTransformer, wavs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    lengths = torch.tensor([len(w) for w in wavs])
    with torch.no_grad():
        return model.eval()(pad_sequence(wavs, batch_first=True), lengths)


def max_valid_difference(a: torch.Tensor, b: torch.Tensor, padding_mask: torch.Tensor) -> float:
    """Largest |a - b| over valid (non-padded) frames."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs()[~padding_mask].max().item()


TRAINING_KEYS = ("steps", "batch_size", "max_seconds", "checkpoint_every", "max_utterances")


def shrink_recipe_steps(recipe_steps: list[dict], /, **sizes) -> list[dict]:
    """A recipe's steps with every training run and data-driven scoring cut to ``sizes`` (for tests).

    Only keys a step already has are changed (``steps=1, batch_size=2, ...``), in the step and its
    ``recovery``; the structure the recipe produces does not depend on them.
    """
    def shrink(options: dict) -> dict:
        return {k: (sizes[k] if k in sizes and k in TRAINING_KEYS else v) for k, v in options.items()}

    shrunk = []
    for step in recipe_steps:
        step = shrink(step)
        if "recovery" in step:
            step["recovery"] = shrink(step["recovery"])
        shrunk.append(step)
    return shrunk
