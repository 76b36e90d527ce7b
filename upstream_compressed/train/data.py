"""Unlabelled audio batches for distillation: reproducible from (seed, epoch, position) alone.

Resuming after a kill must see exactly the batches an uninterrupted run would have seen, so the
order and the crops are functions of the seed, the epoch and the batch position, not of an RNG
that advances as it goes.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from ..audio import SAMPLE_RATE, list_audio, load_audio


@dataclass
class Batch:
    wavs: torch.Tensor  # (B, L) zero-padded
    lengths: torch.Tensor  # (B,)


class AudioBatches:
    """Batches of audio cut to at most ``max_seconds``, grouped by length to waste little padding."""

    def __init__(self, directory: str | os.PathLike, batch_size: int, max_seconds: float, seed: int) -> None:
        self.files: list[Path] = list_audio(directory)
        self.batch_size, self.max_samples, self.seed = batch_size, int(max_seconds * SAMPLE_RATE), seed
        self._cache: dict[Path, torch.Tensor] = {}
        self.lengths = [self._audio(f).numel() for f in self.files]

    def _audio(self, path: Path) -> torch.Tensor:
        if path not in self._cache:
            self._cache[path] = load_audio(path)
        return self._cache[path]

    def batches_per_epoch(self) -> int:
        return max(1, len(self.files) // self.batch_size)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch (file indices), shuffled deterministically by (seed, epoch)."""
        rng = random.Random(self.seed * 100_003 + epoch)
        order = list(range(len(self.files)))
        rng.shuffle(order)
        # Sort within pools of a few batches by length, then shuffle the batches: little padding, still random.
        pool = self.batch_size * 8
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start:start + pool], key=lambda i: self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        batches = [b for b in batches if len(b) == self.batch_size] or batches[:1]
        rng.shuffle(batches)
        return batches

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        """The batch of global ``step`` for process ``rank`` (each rank takes its own slice of batches)."""
        per_epoch = max(1, self.batches_per_epoch() // world_size)
        epoch, position = divmod(step, per_epoch)
        indices = self.epoch_order(epoch)[position * world_size + rank]
        wavs = []
        for i in indices:
            wav = self._audio(self.files[i])
            if wav.numel() > self.max_samples:
                start = random.Random(hash((self.seed, epoch, i)) & 0xFFFFFFFF).randrange(wav.numel() - self.max_samples)
                wav = wav[start:start + self.max_samples]
            wavs.append(wav)
        return Batch(pad_sequence(wavs, batch_first=True), torch.tensor([w.numel() for w in wavs]))
