"""A tiny speech corpus in the real on-disk formats of LibriSpeech and VoxCeleb1, for tests.

The audio is synthetic but structured, so a downstream model has something to learn: every
phone is a harmonic source shaped by its own two formants (vowels, nasals, liquids) or shaped
noise (S, T, K); every speaker has its own pitch and vocal-tract length (formant scale). Words
come from a small ARPAbet lexicon, so the phones are a subset of the real SUPERB vocabulary.
Everything is deterministic for a seed: same seed, same bytes.

    corpus = make_tiny_corpus(tmp_path / "corpus")
    corpus.librispeech            # {root}/LibriSpeech/{train-clean-100,dev-clean,test-clean}/...
    corpus.voxceleb1              # {root}/VoxCeleb1/{dev,test}/wav/id1000x/<video>/0000n.wav
    corpus.ctc_override()         # the -o string that points ctc_libriphone_tiny.yaml at it
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from upstream_compressed.corpus import write_phone_vocab
from upstream_compressed.overrides import CorpusPaths

SAMPLE_RATE = 16000

# phone -> (F1 Hz, F2 Hz, voiced). Rough adult-male formants; speakers scale them.
PHONES: dict[str, tuple[float, float, bool]] = {
    "IY1": (280.0, 2250.0, True),
    "UW1": (310.0, 870.0, True),
    "AA1": (710.0, 1100.0, True),
    "EY1": (480.0, 2000.0, True),
    "M": (250.0, 1000.0, True),
    "N": (250.0, 1700.0, True),
    "L": (360.0, 1300.0, True),
    "R": (420.0, 1250.0, True),
    "S": (4500.0, 6500.0, False),
    "T": (3000.0, 4500.0, False),
    "K": (1600.0, 2800.0, False),
}

LEXICON: dict[str, list[str]] = {
    "SEE": ["S", "IY1"],
    "TEA": ["T", "IY1"],
    "KEY": ["K", "IY1"],
    "MOON": ["M", "UW1", "N"],
    "NOON": ["N", "UW1", "N"],
    "SOON": ["S", "UW1", "N"],
    "TOOL": ["T", "UW1", "L"],
    "MALL": ["M", "AA1", "L"],
    "TALL": ["T", "AA1", "L"],
    "LEAN": ["L", "IY1", "N"],
    "RAIN": ["R", "EY1", "N"],
    "SAKE": ["S", "EY1", "K"],
}

LIBRISPEECH_SPLITS = ("train-clean-100", "dev-clean", "test-clean")


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker: pitch (Hz) and vocal-tract scale (multiplies formants)."""

    f0: float
    formant_scale: float
    loudness: float


def speaker_voice(index: int) -> Voice:
    """Voices far enough apart in pitch and formants to tell speakers apart."""
    return Voice(
        f0=90.0 + 40.0 * index,
        formant_scale=0.9 + 0.07 * (index % 4),
        loudness=0.25 + 0.05 * (index % 3),
    )


def _fade(segment: np.ndarray, samples: int = 80) -> np.ndarray:
    """Raised-cosine ramps (5 ms) so segment joins do not click."""
    ramp = min(samples, len(segment) // 2)
    if ramp > 0:
        window = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, ramp))
        segment[:ramp] *= window
        segment[-ramp:] *= window[::-1]
    return segment


def _formant_gain(freqs: np.ndarray, f1: float, f2: float) -> np.ndarray:
    """Two Gaussian formant peaks over a gently falling floor."""
    peaks = np.exp(-0.5 * ((freqs - f1) / 90.0) ** 2) + 0.7 * np.exp(-0.5 * ((freqs - f2) / 140.0) ** 2)
    return peaks + 0.02 / (1.0 + freqs / 1000.0)


def _voiced(phase: np.ndarray, f0: float, f1: float, f2: float) -> np.ndarray:
    """Harmonics of the running pitch phase, weighted by the formant envelope."""
    harmonics = np.arange(1, int(7000.0 // f0) + 1)
    gains = _formant_gain(harmonics * f0, f1, f2)
    return (gains[:, None] * np.sin(harmonics[:, None] * phase[None, :])).sum(axis=0)


def _unvoiced(n: int, f1: float, f2: float, rng: np.random.Generator) -> np.ndarray:
    """White noise shaped by the formant envelope in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    shaped = np.fft.irfft(spectrum * _formant_gain(freqs, f1, f2), n)
    return shaped / (np.abs(shaped).max() + 1e-9)


def synthesize(words: list[str], voice: Voice, rng: np.random.Generator) -> np.ndarray:
    """Speak ``words`` (from :data:`LEXICON`) with ``voice``: float32 mono at 16 kHz, peak about ``loudness``."""
    pieces: list[np.ndarray] = [np.zeros(int(0.1 * SAMPLE_RATE))]
    phase = 0.0
    for word in words:
        for phone in LEXICON[word]:
            f1, f2, voiced = PHONES[phone]
            f1, f2 = f1 * voice.formant_scale, f2 * voice.formant_scale
            n = int(rng.uniform(0.07, 0.13) * SAMPLE_RATE)
            if voiced:
                # Slight pitch movement inside a phone; the phase runs on across phones.
                f0 = voice.f0 * (1.0 + 0.03 * np.sin(np.linspace(0.0, np.pi, n)))
                phases = phase + 2.0 * np.pi * np.cumsum(f0) / SAMPLE_RATE
                phase = float(phases[-1])
                segment = _voiced(phases, voice.f0, f1, f2)
                segment /= np.abs(segment).max() + 1e-9
            else:
                segment = 0.5 * _unvoiced(n, f1, f2, rng)
            pieces.append(_fade(segment))
        pieces.append(np.zeros(int(rng.uniform(0.03, 0.08) * SAMPLE_RATE)))
    pieces.append(np.zeros(int(0.1 * SAMPLE_RATE)))
    wav = voice.loudness * np.concatenate(pieces)
    wav += 1e-3 * rng.standard_normal(len(wav))  # a noise floor, as in real recordings
    return wav.astype(np.float32)


def _random_words(rng: np.random.Generator, low: int, high: int) -> list[str]:
    words = sorted(LEXICON)
    return [words[i] for i in rng.integers(0, len(words), size=int(rng.integers(low, high + 1)))]


def _write_audio(path: Path, wav: np.ndarray, subtype: str = "PCM_16") -> None:
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), wav, SAMPLE_RATE, subtype=subtype)


def write_lexicon(path: Path, lexicon: dict[str, list[str]] = LEXICON) -> Path:
    """``WORD<TAB>PH PH ...`` lines, the LibriSpeech lexicon format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{word}\t{' '.join(phones)}\n" for word, phones in sorted(lexicon.items())))
    return path


def make_tiny_librispeech(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    num_speakers: int = 4,
    utterances: dict[str, int] | None = None,
    words_per_utterance: tuple[int, int] = (4, 7),
) -> Path:
    """Write ``{root}/{split}/{spk}/{chapter}/{spk}-{chapter}-{nnnn}.flac`` plus ``{spk}-{chapter}.trans.txt``.

    ``utterances``: per split, how many utterances each speaker reads (default 4 train, 2 dev, 2 test).
    """
    root = Path(root)
    utterances = utterances or dict(zip(LIBRISPEECH_SPLITS, (4, 2, 2)))
    for split_index, (split, count) in enumerate(utterances.items()):
        for spk_index in range(num_speakers):
            speaker, chapter = 100 + spk_index, 1000 + 10 * split_index + spk_index
            rng = np.random.default_rng([seed, 1, split_index, spk_index])
            folder = root / split / str(speaker) / str(chapter)
            lines = []
            for utt in range(count):
                utt_id = f"{speaker}-{chapter}-{utt:04d}"
                words = _random_words(rng, *words_per_utterance)
                _write_audio(folder / f"{utt_id}.flac", synthesize(words, speaker_voice(spk_index), rng))
                lines.append(f"{utt_id} {' '.join(words)}\n")
            (folder / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))
    return root


def _video_id(rng: np.random.Generator) -> str:
    """An 11-character YouTube-style id, as VoxCeleb1's folders use (no '-'/'_': no option-like names)."""
    alphabet = np.array(list(string.ascii_letters + string.digits))
    return "".join(rng.choice(alphabet, size=11))


def make_tiny_voxceleb1(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    num_speakers: int = 4,
    per_speaker: tuple[int, int, int] = (4, 2, 2),
    videos_per_speaker: int = 2,
    words_per_utterance: tuple[int, int] = (4, 7),
) -> tuple[Path, Path]:
    """Write ``{root}/{dev,test}/wav/id1000x/<video>/0000n.wav`` and ``{root}/iden_split.txt``.

    Every speaker has ``per_speaker`` = (train, dev, test) utterances, so the label sets of the
    three splits are the same. As in VoxCeleb1, most speakers live under ``dev/wav`` and some
    (here the last one) under ``test/wav``; the split file does not say which. Returns
    ``(root, split_file)``.
    """
    root = Path(root)
    lines = []
    for spk_index in range(num_speakers):
        speaker = f"id{10001 + spk_index}"
        folder = "test" if num_speakers > 1 and spk_index == num_speakers - 1 else "dev"
        rng = np.random.default_rng([seed, 2, spk_index])
        videos = [_video_id(rng) for _ in range(videos_per_speaker)]
        split_ids = [1] * per_speaker[0] + [2] * per_speaker[1] + [3] * per_speaker[2]
        for utt, split_id in enumerate(split_ids):
            video = videos[utt % videos_per_speaker]
            relative = f"{speaker}/{video}/{utt // videos_per_speaker + 1:05d}.wav"
            words = _random_words(rng, *words_per_utterance)
            _write_audio(root / folder / "wav" / relative, synthesize(words, speaker_voice(spk_index), rng))
            lines.append(f"{split_id} {relative}\n")
    split_file = root / "iden_split.txt"
    split_file.write_text("".join(lines))
    return root, split_file


@dataclass(frozen=True)
class TinyCorpus(CorpusPaths):
    """Paths of a corpus written by :func:`make_tiny_corpus`."""

    librispeech_splits: tuple[str, ...] = field(default=LIBRISPEECH_SPLITS)


def make_tiny_corpus(root: str | os.PathLike, *, seed: int = 0, num_speakers: int = 4) -> TinyCorpus:
    """Write a tiny LibriSpeech (with lexicon and phone vocabulary) and a tiny VoxCeleb1 under ``root``."""
    root = Path(root)
    librispeech = make_tiny_librispeech(root / "LibriSpeech", seed=seed, num_speakers=num_speakers)
    voxceleb1, split_file = make_tiny_voxceleb1(root / "VoxCeleb1", seed=seed, num_speakers=num_speakers)
    return TinyCorpus(
        root=root,
        librispeech=librispeech,
        lexicon=write_lexicon(root / "lexicon.txt"),
        phone_vocab=write_phone_vocab(root / "phoneme.txt"),
        voxceleb1=voxceleb1,
        voxceleb1_split=split_file,
    )
