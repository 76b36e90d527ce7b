"""HuBERT's first-iteration targets: k-means clusters of MFCC frames (13 MFCCs + deltas + delta-deltas, 100 Hz).

As in HuBERT's recipe, the features are Kaldi-style MFCCs at a 10 ms shift and the clusters come
from plain k-means; here the k-means is a small, seeded torch implementation (k-means++ start, Lloyd
iterations), so the same frames and seed give the same centroids.
"""

from __future__ import annotations

import torch
from torch import Tensor

MFCC_RATE = 100  # frames per second (10 ms shift): the label rate written into the checkpoint


def mfcc_features(wav: Tensor, sample_rate: int = 16000) -> Tensor:
    """(L,) float waveform in [-1, 1] -> (T, 39) MFCC + delta + delta-delta, T = (L - 400) // 160 + 1."""
    import torchaudio.compliance.kaldi as kaldi
    import torchaudio.functional as AF

    # Kaldi expects 16-bit sample values; no dither so that features are a pure function of the audio.
    mfcc = kaldi.mfcc(wav[None] * 32768.0, sample_frequency=sample_rate, use_energy=False, dither=0.0)
    deltas = AF.compute_deltas(mfcc.T[None])[0]
    delta_deltas = AF.compute_deltas(deltas[None])[0]
    return torch.cat([mfcc.T, deltas, delta_deltas]).T.contiguous()


def _squared_distances(x: Tensor, centroids: Tensor) -> Tensor:
    return (x * x).sum(1, keepdim=True) - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]


def assign(x: Tensor, centroids: Tensor, chunk: int = 65536) -> Tensor:
    """Index of the nearest centroid for each row of ``x``."""
    return torch.cat([_squared_distances(part, centroids).argmin(1) for part in x.split(chunk)])


def kmeans(x: Tensor, k: int, *, iterations: int = 50, seed: int = 0, init_sample: int = 50000) -> tuple[Tensor, float]:
    """Fit ``k`` centroids to the rows of ``x``; returns (centroids, mean squared distance to them)."""
    if len(x) < k:
        raise ValueError(f"k-means needs at least {k} frames, got {len(x)}; make a larger corpus or lower --clusters")
    generator = torch.Generator().manual_seed(seed)
    sample = x[torch.randperm(len(x), generator=generator)[:init_sample]]
    # k-means++: each next centroid is drawn with probability proportional to its squared distance.
    centroids = sample[torch.randint(len(sample), (1,), generator=generator)]
    closest = _squared_distances(sample, centroids)[:, 0].clamp_min(0)
    for _ in range(1, k):
        index = torch.multinomial(closest + 1e-12, 1, generator=generator)
        centroids = torch.cat([centroids, sample[index]])
        closest = torch.minimum(closest, _squared_distances(sample, sample[index])[:, 0].clamp_min(0))
    for _ in range(iterations):
        labels = assign(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        empty = counts == 0
        # An empty cluster restarts at a random frame rather than collapsing.
        refill = x[torch.randint(len(x), (int(empty.sum()),), generator=generator)]
        centroids = torch.where(empty[:, None], torch.zeros_like(centroids), sums / counts.clamp_min(1)[:, None])
        centroids[empty] = refill
    labels = assign(x, centroids)
    inertia = float(((x - centroids[labels]) ** 2).sum(1).mean())
    return centroids, inertia
