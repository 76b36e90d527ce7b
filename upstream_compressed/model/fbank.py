"""MelHuBERT's front end: Kaldi log-mel filterbank features instead of a convolutional feature extractor.

Per utterance: the waveform scaled to the 16-bit range, Kaldi fbank (25 ms Hamming window, 10 ms
shift, no dither), normalised per dimension by the pre-training corpus statistics (``mean``/``std``
buffers, loaded from the checkpoint's mean/std file), and optionally two consecutive frames
concatenated into one 20 ms frame (an odd last frame is paired with zeros). Each utterance is
computed from its own valid samples, so padding in a batch never changes a valid frame.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from .config import FBANK_SHIFT, FBANK_WINDOW

SAMPLE_RATE = 16000
INT16_SCALE = 2.0**15  # Kaldi (and MelHuBERT) compute fbank on 16-bit integer-valued samples


class FbankFrontEnd(nn.Module):
    """(B, L) waveforms + valid lengths -> (B, T, mel_bins * stack) normalised fbank features."""

    def __init__(self, mel_bins: int, stack: int) -> None:
        super().__init__()
        self.mel_bins, self.stack = mel_bins, stack
        # Statistics of the pre-training corpus; the identity until a checkpoint's file is loaded.
        self.register_buffer("mean", torch.zeros(mel_bins))
        self.register_buffer("std", torch.ones(mel_bins))

    def frame_counts(self, wav_lengths: Tensor) -> Tensor:
        """Output frames per utterance: Kaldi's ``snip_edges`` count, then halved (rounded up) if stacked."""
        fbank_frames = torch.where(
            wav_lengths >= FBANK_WINDOW,
            torch.div(wav_lengths - FBANK_WINDOW, FBANK_SHIFT, rounding_mode="floor") + 1,
            torch.zeros_like(wav_lengths),
        )
        return torch.div(fbank_frames + self.stack - 1, self.stack, rounding_mode="floor")

    def features(self, wav: Tensor) -> Tensor:
        """One utterance (L,) -> (T, mel_bins * stack)."""
        from torchaudio.compliance.kaldi import fbank

        frames = fbank(
            wav.float()[None] * INT16_SCALE,
            num_mel_bins=self.mel_bins,
            sample_frequency=SAMPLE_RATE,
            frame_length=1000 * FBANK_WINDOW / SAMPLE_RATE,
            frame_shift=1000 * FBANK_SHIFT / SAMPLE_RATE,
            window_type="hamming",
            dither=0.0,
        )
        frames = (frames - self.mean.float()) / self.std.float()
        if self.stack > 1:
            odd = (-frames.shape[0]) % self.stack
            frames = torch.cat([frames, frames.new_zeros(odd, self.mel_bins)])
            # Row t of the reshape is frames[stack*t], ..., frames[stack*t + stack-1] side by side.
            frames = frames.reshape(-1, self.mel_bins * self.stack)
        return frames

    def forward(self, wav: Tensor, wav_lengths: Tensor) -> Tensor:
        short = wav_lengths < FBANK_WINDOW
        if bool(short.any()):
            raise ValueError(
                f"utterance(s) {short.nonzero().flatten().tolist()} are shorter than one fbank window "
                f"({FBANK_WINDOW} samples, 25 ms at 16 kHz)"
            )
        utterances = [self.features(w[:n]) for w, n in zip(wav, wav_lengths.tolist())]
        return pad_sequence(utterances, batch_first=True).to(wav.dtype if wav.is_floating_point() else torch.float32)
