"""Audio from a folder or a manifest (:mod:`.manifest`): the unlabelled speech that data-driven scoring and recovery training use."""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

SAMPLE_RATE = 16000
AUDIO_SUFFIXES = (".wav", ".flac")


def missing_hint(path: Path) -> str:
    """Why an audio path that does not exist may be wrong."""
    return ("set the variables it names?" if path.is_absolute()
            else f"relative paths are taken from the current directory, {Path.cwd()}")


def list_audio(source: str | os.PathLike) -> list[Path]:
    """Every .wav/.flac file below a folder, sorted (so runs are reproducible), or the files a manifest lists."""
    source = Path(os.path.expandvars(os.path.expanduser(str(source))))
    if source.is_file():
        from .manifest import read_manifest

        manifest = read_manifest(source)
        return [manifest.path(i) for i in range(len(manifest))]
    if not source.is_dir():
        raise FileNotFoundError(f"audio directory or manifest {source} does not exist ({missing_hint(source)})")
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no .wav or .flac files below {source}")
    return files


def sample_audio(source: str | os.PathLike, count: int, seed: int = 0) -> list[Path]:
    """``count`` files drawn at random (by ``seed``) from the whole corpus, in corpus order.

    Data-driven scores are averages over utterances; the first files of a sorted LibriSpeech are
    one speaker's first chapter, so a sample must come from everywhere.
    """
    files = list_audio(source)
    if count >= len(files):
        return files
    return [files[i] for i in sorted(random.Random(seed).sample(range(len(files)), count))]


def load_audio(path: str | os.PathLike, max_seconds: float | None = None) -> torch.Tensor:
    """A mono float32 waveform at 16 kHz (resampled if needed), optionally cut to ``max_seconds``."""
    import soundfile

    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return _mono_16k(data, rate, max_seconds)


def load_segment(path: str | os.PathLike, start: int, samples: int) -> torch.Tensor:
    """``samples`` samples of a 16 kHz file from ``start`` on, decoding only that part (a crop of a long file)."""
    import soundfile

    data, rate = soundfile.read(str(path), start=start, frames=samples, dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path} is {rate} Hz; a segment is read only from 16 kHz audio (make a manifest)")
    return _mono_16k(data, rate, None)


def _mono_16k(data, rate: int, max_seconds: float | None) -> torch.Tensor:
    wav = torch.from_numpy(data.mean(axis=1))
    if rate != SAMPLE_RATE:
        import torchaudio.functional

        wav = torchaudio.functional.resample(wav, rate, SAMPLE_RATE)
    if max_seconds is not None:
        wav = wav[: int(max_seconds * SAMPLE_RATE)]
    return wav
