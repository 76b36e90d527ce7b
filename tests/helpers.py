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
