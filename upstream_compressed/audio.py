"""Audio from a directory: the unlabelled speech that data-driven scoring and recovery training use."""

from __future__ import annotations

import os
from pathlib import Path

import torch

SAMPLE_RATE = 16000
AUDIO_SUFFIXES = (".wav", ".flac")


def list_audio(directory: str | os.PathLike) -> list[Path]:
    """Every .wav/.flac file below ``directory``, sorted (so runs are reproducible)."""
    directory = Path(os.path.expandvars(os.path.expanduser(str(directory))))
    if not directory.is_dir():
        hint = ("set the variables it names?" if directory.is_absolute()
                else f"relative paths are taken from the current directory, {Path.cwd()}")
        raise FileNotFoundError(f"audio directory {directory} does not exist ({hint})")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no .wav or .flac files below {directory}")
    return files


def load_audio(path: str | os.PathLike, max_seconds: float | None = None) -> torch.Tensor:
    """A mono float32 waveform at 16 kHz (resampled if needed), optionally cut to ``max_seconds``."""
    import soundfile

    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    wav = torch.from_numpy(data.mean(axis=1))
    if rate != SAMPLE_RATE:
        import torchaudio.functional

        wav = torchaudio.functional.resample(wav, rate, SAMPLE_RATE)
    if max_seconds is not None:
        wav = wav[: int(max_seconds * SAMPLE_RATE)]
    return wav
