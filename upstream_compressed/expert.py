"""UpstreamExpert: the S3PRL upstream contract around a :class:`SpeechTransformer`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from .model import SpeechTransformer

SAMPLE_RATE = 16000


def validate_wavs(wavs: Sequence[Tensor], min_samples: int) -> None:
    """Refuse audio the model cannot meaningfully run on, naming the utterance and the problem."""
    if isinstance(wavs, Tensor) or not isinstance(wavs, (list, tuple)):
        raise ValueError("upstream input must be a list of 1-D waveform tensors (16 kHz), one per utterance")
    if len(wavs) == 0:
        raise ValueError("upstream input is an empty list: give at least one waveform")
    for i, wav in enumerate(wavs):
        if not isinstance(wav, Tensor):
            raise ValueError(f"waveform {i} is a {type(wav).__name__}, not a torch.Tensor")
        if wav.dim() != 1:
            raise ValueError(
                f"waveform {i} has shape {tuple(wav.shape)}; expected a 1-D mono waveform "
                "(mix multi-channel audio down to one channel first)"
            )
        if wav.is_complex() or wav.dtype == torch.bool:
            raise ValueError(f"waveform {i} has dtype {wav.dtype}; expected real samples in [-1, 1] as a float tensor")
        if not torch.is_floating_point(wav):
            raise ValueError(
                f"waveform {i} has integer dtype {wav.dtype}; convert to float in [-1, 1] "
                "(e.g. int16 samples / 32768)"
            )
        if wav.numel() < min_samples:
            raise ValueError(
                f"waveform {i} has {wav.numel()} samples; the front end needs at least {min_samples} "
                f"({min_samples / SAMPLE_RATE * 1000:.0f} ms at 16 kHz) to produce one frame"
            )
        if not bool(torch.isfinite(wav).all()):
            raise ValueError(f"waveform {i} contains NaN or infinite values")


class UpstreamExpert(nn.Module):
    """What ``run_downstream.py -u NAME`` gets: ``forward(wavs) -> {"hidden_states": [...]}``."""

    def __init__(self, model: SpeechTransformer, manifest: dict | None = None) -> None:
        super().__init__()
        self.model = model
        self.manifest = manifest or {}

    def get_downsample_rates(self, key: str) -> int:
        return self.model.config.downsample_rate

    def forward(self, wavs: Sequence[Tensor]) -> dict[str, object]:
        validate_wavs(wavs, self.model.config.receptive_field)
        # Any float precision is fine (float64 from numpy, half from a loader): compute in the model's.
        dtype = self.model.input_dtype
        lengths = torch.tensor([len(wav) for wav in wavs], device=wavs[0].device)
        states, padding_mask = self.model(pad_sequence([wav.to(dtype) for wav in wavs], batch_first=True), lengths)
        return {
            "hidden_states": states,
            "last_hidden_state": states[-1],
            "pad_mask": ~padding_mask,  # S3PRL's convention: True on valid frames
        }
