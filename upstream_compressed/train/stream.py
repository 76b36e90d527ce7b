"""Streamed audio batches for training: read by DataLoader workers, planned from a manifest's lengths.

Nothing here holds the corpus in memory: which files form a batch is planned from the manifest's
lengths alone (no audio read), and only the files of the batches being prefetched are decoded, by
worker processes, while the GPU trains on the previous batch.

Exact resume and DDP both rest on one property: the batch of global step ``s`` on rank ``r`` is a
pure function of (seed, epoch, position), computed by :class:`BatchPlan` without any RNG that
advances as training goes. A killed run restarts its loader at the step it stopped at and sees the
very batches an uninterrupted run would have; ranks take disjoint slices of every epoch.
"""

from __future__ import annotations

import bisect
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Sampler

from ..audio import SAMPLE_RATE, load_segment
from ..audio.manifest import Manifest

POOL_BATCHES = 8  # files are sorted by length within pools of this many batches: little padding, still random


@dataclass(frozen=True)
class BatchRule:
    """How many files make a batch: a fixed ``batch_size``, or as many as fit ``seconds_per_batch``.

    ``seconds_per_batch`` bounds the padded size (files x longest cropped file), which is what the
    GPU holds: fairseq's ``max_tokens`` and DPHuBERT's ``seconds_per_batch`` bound the same thing.
    """

    batch_size: int | None = 4
    seconds_per_batch: float | None = None
    max_seconds: float = 4.0  # every file is cut to at most this (a random crop, fixed by seed and epoch)

    def __post_init__(self) -> None:
        if (self.batch_size is None) == (self.seconds_per_batch is None):
            raise ValueError("give exactly one of batch_size and seconds_per_batch")
        if self.seconds_per_batch is not None and self.seconds_per_batch < self.max_seconds:
            raise ValueError(f"seconds_per_batch {self.seconds_per_batch} must be at least max_seconds "
                             f"{self.max_seconds}, or the longest files would fit no batch")

    @property
    def max_samples(self) -> int:
        return int(self.max_seconds * SAMPLE_RATE)


class BatchPlan:
    """Every epoch's batches (lists of file indices), from the manifest's lengths, seed and epoch only."""

    def __init__(self, num_samples: Sequence[int], rule: BatchRule, seed: int, world_size: int = 1) -> None:
        self.lengths = [min(n, rule.max_samples) for n in num_samples]
        self.rule, self.seed, self.world_size = rule, seed, world_size
        if len(self.lengths) < (rule.batch_size or 1) * world_size:
            raise ValueError(f"{len(self.lengths)} files cannot fill one batch on each of {world_size} process(es)")
        self._epoch_cache: dict[int, list[list[int]]] = {}
        self._steps_before: list[int] = [0]  # global steps before each epoch, grown as needed

    def epoch(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch, shuffled deterministically by (seed, epoch)."""
        if epoch not in self._epoch_cache:
            if len(self._epoch_cache) > 2:  # an epoch of LibriSpeech is ~10^4 batches: keep few
                self._epoch_cache.pop(min(self._epoch_cache))
            self._epoch_cache[epoch] = self._plan(epoch)
        return self._epoch_cache[epoch]

    def _plan(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 100_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        per_pool = POOL_BATCHES * (self.rule.batch_size or self._files_per_second_batch())
        batches: list[list[int]] = []
        for start in range(0, len(order), per_pool):
            pool = sorted(order[start:start + per_pool], key=lambda i: self.lengths[i])
            batches += self._cut(pool)
        if self.rule.batch_size is not None:
            batches = [b for b in batches if len(b) == self.rule.batch_size] or batches[:1]
        rng.shuffle(batches)
        return batches

    def _files_per_second_batch(self) -> int:
        mean = sum(self.lengths) / len(self.lengths)
        return max(1, int(self.rule.seconds_per_batch * SAMPLE_RATE / mean))

    def _cut(self, pool: list[int]) -> list[list[int]]:
        if self.rule.batch_size is not None:
            return [pool[i:i + self.rule.batch_size] for i in range(0, len(pool), self.rule.batch_size)]
        budget = self.rule.seconds_per_batch * SAMPLE_RATE
        batches, current = [], []
        for index in pool:  # ascending lengths: the newest file is the longest of its batch
            if current and (len(current) + 1) * self.lengths[index] > budget:
                batches.append(current)
                current = []
            current.append(index)
        return batches + ([current] if current else [])

    def steps_in_epoch(self, epoch: int) -> int:
        """Global steps in one epoch: every rank takes one batch a step."""
        return max(1, len(self.epoch(epoch)) // self.world_size)

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, position within the epoch) of global step ``step``."""
        while self._steps_before[-1] <= step:
            self._steps_before.append(self._steps_before[-1] + self.steps_in_epoch(len(self._steps_before) - 1))
        epoch = bisect.bisect_right(self._steps_before, step) - 1
        return epoch, step - self._steps_before[epoch]

    def batch(self, step: int, rank: int = 0) -> tuple[int, list[int]]:
        """(epoch, file indices) of global ``step`` on ``rank``."""
        epoch, position = self.locate(step)
        return epoch, self.epoch(epoch)[position * self.world_size + rank]


class StepSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for global steps ``start`` .. ``end - 1``, this rank's batch as (epoch, file index) pairs."""

    def __init__(self, plan: BatchPlan, start: int, end: int, rank: int = 0) -> None:
        self.plan, self.start, self.end, self.rank = plan, start, end, rank

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end):
            epoch, indices = self.plan.batch(step, self.rank)
            yield [(epoch, i) for i in indices]


@dataclass
class Item:
    wav: torch.Tensor | None
    path: str
    error: str | None = None


class CroppedAudio(Dataset):
    """File ``i`` of a manifest, cut to ``max_samples`` at a start fixed by (seed, epoch, i)."""

    def __init__(self, manifest: Manifest, max_samples: int, seed: int) -> None:
        self.root, self.files, self.max_samples, self.seed = manifest.root, manifest.files, max_samples, seed
        self.num_samples = manifest.num_samples

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        epoch, index = key
        path, length = str(self.root / self.files[index]), self.num_samples[index]
        # The crop's start follows from the manifest's length, so only the crop is decoded.
        start = random.Random(f"{self.seed}:{epoch}:{index}").randrange(length - self.max_samples) \
            if length > self.max_samples else 0
        try:
            wav = load_segment(path, start, min(length, self.max_samples))
        except Exception as error:  # noqa: BLE001 - a file that fails to decode is skipped, never a traceback
            return Item(None, path, f"{type(error).__name__}: {error}")
        if wav.numel() == 0:
            return Item(None, path, "no samples")
        return Item(wav, path)


@dataclass
class Batch:
    wavs: torch.Tensor  # (B, L) zero-padded
    lengths: torch.Tensor  # (B,)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of files that failed to decode

    def pin_memory(self) -> "Batch":
        return Batch(self.wavs.pin_memory(), self.lengths.pin_memory(), self.skipped)

    def __len__(self) -> int:
        return int(self.lengths.numel())


def collate(items: list[Item]) -> Batch:
    """Pad the decoded files; files that failed are left out and reported in ``skipped``."""
    good = [item.wav for item in items if item.wav is not None]
    skipped = [(item.path, item.error or "") for item in items if item.wav is None]
    if not good:
        return Batch(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), skipped)
    return Batch(pad_sequence(good, batch_first=True), torch.tensor([w.numel() for w in good]), skipped)


def default_workers() -> int:
    """min(4, cores): enough to decode ahead of a GPU step, few enough to leave cores to the trainer."""
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def batch_loader(manifest: Manifest, plan: BatchPlan, start: int, end: int, rank: int = 0,
                 num_workers: int | None = None, pin_memory: bool = False, prefetch_factor: int = 2) -> DataLoader:
    """A DataLoader over global steps ``start`` .. ``end - 1`` of ``plan`` for ``rank``.

    Memory is bounded by ``num_workers x prefetch_factor`` batches, whatever the corpus size.
    """
    workers = default_workers() if num_workers is None else num_workers
    return DataLoader(
        CroppedAudio(manifest, plan.rule.max_samples, plan.seed),
        batch_sampler=StepSampler(plan, start, end, rank),
        collate_fn=collate,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        persistent_workers=False,
        # Starting an iterator draws a seed; from the global RNG it would shift the training's random
        # stream, so a resumed run (whose loader starts later) would not continue the same one.
        generator=torch.Generator().manual_seed(plan.seed),
    )


def warn_skipped(batch: Batch, step: int) -> None:
    for path, why in batch.skipped:
        print(f"warning: step {step}: skipped {path}: it failed to decode ({why})", file=sys.stderr, flush=True)
