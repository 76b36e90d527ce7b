"""A small real English speech corpus, synthesised offline by espeak-ng, in two on-disk layouts.

    DIR/LibriSpeech/{train-clean-100,dev-clean,test-clean}/{spk}/{chapter}/{spk}-{chapter}-{nnnn}.flac
    DIR/LibriSpeech/.../{spk}-{chapter}.trans.txt      lines "ID WORD WORD ..."
    DIR/lexicon.txt                                     lines "WORD<TAB>PH PH ..." (ARPAbet with stress)
    DIR/phoneme.txt                                     the 71-token ARPAbet vocabulary, one per line
    DIR/VoxCeleb1/{dev,test}/wav/id1xxxx/<video>/<nnnnn>.wav
    DIR/VoxCeleb1/iden_split.txt                        lines "1|2|3 id10001/<video>/00001.wav"
    DIR/corpus.json                                     options, speakers, counts and hours (written last)

S3PRL's unchanged ``ctc`` (libriphone corpus) and ``voxceleb1`` downstreams read these trees.

Sentences are 4-12 words drawn uniformly from :data:`vocabulary.WORDS`; the lexicon gives each word
espeak-ng's own en-us pronunciation mapped to ARPAbet (:mod:`phones`). A speaker is an espeak-ng voice
variant at a pitch level, with its own pitch range and speaking rate; every utterance jitters pitch
and rate a little and adds a faint noise floor at its own level, as recordings do.

- LibriSpeech: speakers are disjoint across splits (about 80/10/10), as in LibriSpeech; each reads
  ``utterances`` sentences in one chapter.
- VoxCeleb1: a second, disjoint set of speakers (different voice settings), ids id10001...; each has
  five "videos" (sessions with their own pitch/rate offset, loudness and noise floor); videos 1-3
  are train (1), video 4 dev (2), video 5 test (3), so test sessions are unseen, as in VoxCeleb1.

Everything is a function of the options: the same options give the same bytes (see ``espeak.py``
for why synthesis runs in a fresh child process).
"""

from __future__ import annotations

import json
import os
import shutil
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..corpus import arpabet_phones, write_phone_vocab
from ..overrides import CorpusPaths
from .espeak import EspeakProcess, Voice
from .phones import espeak_to_arpabet
from .vocabulary import WORDS

CORPUS_FORMAT = 1  # bump when a change alters the bytes a given set of options produces
SAMPLE_RATE = 16000
LIBRISPEECH_SPLITS = ("train-clean-100", "dev-clean", "test-clean")
VIDEOS_PER_SPEAKER = 5
VIDEO_SPLITS = (1, 1, 1, 2, 3)  # VoxCeleb1 split id of each video: train, train, train, dev, test

# espeak-ng en-us voice variants that sound like distinct, natural-ish speakers (the whispery
# "klatt"/"klatt2" and the unvoiced "grandpa" are left out).
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
    "klatt3", "klatt4", "klatt5", "klatt6", "Andy", "Annie", "steph", "linda", "belinda", "max",
    "michel", "benjamin", "travis", "aunty", "Alex", "Lee", "Mike", "robert", "edward", "john",
)
PITCH_LEVELS = (30, 50, 70)
MAX_SPEAKERS = len(VARIANTS) * len(PITCH_LEVELS) // 2  # per tree; the two trees never share a voice


class CorpusOptionsError(ValueError):
    """Corpus options that cannot make a usable corpus; the message says which and why."""


@dataclass(frozen=True)
class CorpusOptions:
    """What to make. The defaults give about 1.8 hours of audio (1.2 h LibriSpeech, 0.6 h VoxCeleb1)."""

    speakers: int = 40  # per tree (LibriSpeech and VoxCeleb1 each)
    utterances: int = 40  # per LibriSpeech speaker
    sid_utterances: int = 20  # per VoxCeleb1 speaker, spread over 5 videos
    seed: int = 0
    min_words: int = 4
    max_words: int = 12

    def validate(self) -> None:
        if not 3 <= self.speakers <= MAX_SPEAKERS:
            raise CorpusOptionsError(
                f"--speakers must be between 3 (one per LibriSpeech split) and {MAX_SPEAKERS} "
                f"({len(VARIANTS)} voice variants x {len(PITCH_LEVELS)} pitch levels, halved between the two trees); "
                f"got {self.speakers}"
            )
        if self.utterances < 1:
            raise CorpusOptionsError(f"--utterances must be at least 1, got {self.utterances}")
        if self.sid_utterances < VIDEOS_PER_SPEAKER:
            raise CorpusOptionsError(
                f"--sid-utterances must be at least {VIDEOS_PER_SPEAKER} (one per video, so that every speaker "
                f"is in train, dev and test); got {self.sid_utterances}"
            )
        if not 1 <= self.min_words <= self.max_words:
            raise CorpusOptionsError(f"need 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}")


@dataclass(frozen=True)
class Speaker:
    id: str
    voice: Voice
    split: str  # LibriSpeech split, or the VoxCeleb1 folder ("dev"/"test")


@dataclass(frozen=True)
class Utterance:
    path: str  # relative to the corpus root
    words: tuple[str, ...]
    voice: Voice
    seed: int
    snr_db: float  # noise floor below the speech RMS
    peak: float  # peak amplitude after scaling


@dataclass(frozen=True)
class SynthCorpus(CorpusPaths):
    """Paths of a corpus written by :func:`make_corpus`."""

    manifest: Path
    librispeech_splits: tuple[str, ...] = field(default=LIBRISPEECH_SPLITS)

    @classmethod
    def at(cls, root: str | os.PathLike) -> "SynthCorpus":
        root = Path(root)
        return cls(
            root=root,
            librispeech=root / "LibriSpeech",
            lexicon=root / "lexicon.txt",
            phone_vocab=root / "phoneme.txt",
            voxceleb1=root / "VoxCeleb1",
            voxceleb1_split=root / "VoxCeleb1" / "iden_split.txt",
            manifest=root / "corpus.json",
        )


# ------------------------------------------------------------------------------------ planning
def _rng(options: CorpusOptions, *keys: int) -> np.random.Generator:
    # One stream per (purpose, speaker, utterance): an utterance does not change when counts do.
    return np.random.default_rng([CORPUS_FORMAT, options.seed, *keys])


def _speaker_voices(options: CorpusOptions) -> tuple[list[Voice], list[Voice]]:
    """Voices for the LibriSpeech speakers and (disjoint) the VoxCeleb1 speakers."""
    rng = _rng(options, 0)
    grid = [(variant, pitch) for variant in VARIANTS for pitch in PITCH_LEVELS]
    order = rng.permutation(len(grid))
    voices = []
    for index in order[: 2 * options.speakers]:
        variant, pitch = grid[index]
        voices.append(Voice(variant, pitch, range=int(rng.integers(35, 66)), rate=int(rng.integers(150, 196))))
    return voices[: options.speakers], voices[options.speakers :]


def _jitter(voice: Voice, rng: np.random.Generator, pitch: int, rate: int) -> Voice:
    return Voice(
        voice.variant,
        int(np.clip(voice.pitch + rng.integers(-pitch, pitch + 1), 0, 100)),
        voice.range,
        int(np.clip(voice.rate + rng.integers(-rate, rate + 1), 80, 450)),
        voice.volume,
    )


def _sentence(options: CorpusOptions, rng: np.random.Generator) -> tuple[str, ...]:
    count = int(rng.integers(options.min_words, options.max_words + 1))
    return tuple(WORDS[i] for i in rng.integers(0, len(WORDS), size=count))


def _held_out(speakers: int) -> int:
    return max(1, round(0.1 * speakers))


def librispeech_plan(options: CorpusOptions) -> tuple[list[Speaker], list[Utterance]]:
    voices, _ = _speaker_voices(options)
    held = _held_out(options.speakers)
    speakers, utterances = [], []
    for index, voice in enumerate(voices):
        split = (
            LIBRISPEECH_SPLITS[2] if index >= options.speakers - held
            else LIBRISPEECH_SPLITS[1] if index >= options.speakers - 2 * held
            else LIBRISPEECH_SPLITS[0]
        )
        speaker, chapter = str(1001 + index), str(10010 + 10 * index)
        speakers.append(Speaker(speaker, voice, split))
        for number in range(options.utterances):
            rng = _rng(options, 1, index, number)
            utterances.append(
                Utterance(
                    path=f"LibriSpeech/{split}/{speaker}/{chapter}/{speaker}-{chapter}-{number:04d}.flac",
                    words=_sentence(options, rng),
                    voice=_jitter(voice, rng, pitch=3, rate=6),
                    seed=int(rng.integers(1, 2**31 - 1)),
                    snr_db=float(rng.uniform(30.0, 50.0)),
                    peak=float(rng.uniform(0.3, 0.9)),
                )
            )
    return speakers, utterances


def _video_id(rng: np.random.Generator) -> str:
    """An 11-character YouTube-style id (letters and digits only, so no name looks like an option)."""
    alphabet = np.array(list(string.ascii_letters + string.digits))
    return "".join(rng.choice(alphabet, size=11))


def voxceleb1_plan(options: CorpusOptions) -> tuple[list[Speaker], list[Utterance], list[str]]:
    """Speakers, utterances and the ``iden_split.txt`` lines."""
    _, voices = _speaker_voices(options)
    held = _held_out(options.speakers)
    speakers, utterances, split_lines = [], [], []
    for index, voice in enumerate(voices):
        speaker = f"id{10001 + index}"
        folder = "test" if index >= options.speakers - held else "dev"  # as VoxCeleb1: some speakers under test/
        speakers.append(Speaker(speaker, voice, folder))
        rng = _rng(options, 2, index)
        # A video is a recording session: its own pitch/rate offset, loudness and noise floor.
        sessions = [
            (_video_id(rng), _jitter(voice, rng, pitch=5, rate=10), float(rng.uniform(25.0, 45.0)), float(rng.uniform(0.3, 0.9)))
            for _ in range(VIDEOS_PER_SPEAKER)
        ]
        for number in range(options.sid_utterances):
            video_index = number % VIDEOS_PER_SPEAKER
            video, session_voice, snr_db, peak = sessions[video_index]
            rng_utt = _rng(options, 3, index, number)
            relative = f"{speaker}/{video}/{number // VIDEOS_PER_SPEAKER + 1:05d}.wav"
            utterances.append(
                Utterance(
                    path=f"VoxCeleb1/{folder}/wav/{relative}",
                    words=_sentence(options, rng_utt),
                    voice=_jitter(session_voice, rng_utt, pitch=2, rate=4),
                    seed=int(rng_utt.integers(1, 2**31 - 1)),
                    snr_db=snr_db + float(rng_utt.uniform(-2.0, 2.0)),
                    peak=peak * float(rng_utt.uniform(0.9, 1.1)),
                )
            )
            split_lines.append(f"{VIDEO_SPLITS[video_index]} {relative}")
    return speakers, utterances, split_lines


# ------------------------------------------------------------------------------------ audio
def finish_audio(samples: np.ndarray, source_rate: int, utterance: Utterance) -> np.ndarray:
    """espeak-ng's int16 samples -> int16 at 16 kHz: resampled, padded with silence, scaled, noise floor added."""
    from scipy.signal import resample_poly

    rng = np.random.default_rng([utterance.seed, 7])
    gcd = np.gcd(SAMPLE_RATE, source_rate)
    wav = resample_poly(samples.astype(np.float64) / 32768.0, SAMPLE_RATE // gcd, source_rate // gcd)
    pad = rng.integers(int(0.05 * SAMPLE_RATE), int(0.3 * SAMPLE_RATE), size=2)
    wav = np.concatenate([np.zeros(pad[0]), wav, np.zeros(pad[1])])
    wav *= utterance.peak / max(np.abs(wav).max(), 1e-9)
    speech_rms = float(np.sqrt(np.mean(wav[np.abs(wav) > 1e-4] ** 2))) if np.any(np.abs(wav) > 1e-4) else 0.0
    wav += rng.standard_normal(len(wav)) * speech_rms * 10.0 ** (-utterance.snr_db / 20.0)
    return np.clip(np.round(wav * 32767.0), -32768, 32767).astype(np.int16)


def _write_audio(path: Path, samples: np.ndarray) -> None:
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "FLAC" if path.suffix == ".flac" else "WAV"
    soundfile.write(str(path), samples, SAMPLE_RATE, subtype="PCM_16", format=fmt)


# ------------------------------------------------------------------------------------ writing
OUTPUTS = ("LibriSpeech", "VoxCeleb1", "lexicon.txt", "phoneme.txt", "corpus.json")


def _prepare(root: Path, overwrite: bool) -> None:
    existing = [name for name in OUTPUTS if (root / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{root} already holds a corpus ({', '.join(existing)}); pass --overwrite to replace it"
        )
    for name in existing:
        target = root / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    root.mkdir(parents=True, exist_ok=True)


def build_lexicon(engine: EspeakProcess) -> dict[str, list[str]]:
    """Every vocabulary word (upper case, as LibriSpeech) -> its ARPAbet phones from espeak-ng."""
    return {word.upper(): espeak_to_arpabet(engine.phonemes(word), word) for word in WORDS}


def _progress(total: int, enabled: bool):  # -> tqdm
    from tqdm import tqdm

    return tqdm(total=total, unit="utt", desc="make-corpus", disable=not enabled, dynamic_ncols=True)


def make_corpus(
    root: str | os.PathLike, options: CorpusOptions = CorpusOptions(), *, progress: bool = True, overwrite: bool = False
) -> SynthCorpus:
    """Synthesise the corpus under ``root`` (see the module docstring) and return its paths."""
    options.validate()
    root = Path(root)
    _prepare(root, overwrite)
    corpus = SynthCorpus.at(root)
    ls_speakers, ls_utterances = librispeech_plan(options)
    vox_speakers, vox_utterances, split_lines = voxceleb1_plan(options)

    seconds: dict[str, float] = {}
    with EspeakProcess() as engine:
        lexicon = build_lexicon(engine)
        vocab = set(arpabet_phones())
        unknown = sorted({p for phones in lexicon.values() for p in phones} - vocab)
        if unknown:  # the mapping only emits ARPAbet; this guards against a bad edit of phones.py
            raise CorpusOptionsError(f"phones {unknown} are not in the ARPAbet vocabulary")
        bar = _progress(len(ls_utterances) + len(vox_utterances), progress)
        for utterance in ls_utterances + vox_utterances:
            text = " ".join(utterance.words) + "."
            samples = finish_audio(engine.synthesize(text, utterance.voice, utterance.seed), engine.sample_rate, utterance)
            _write_audio(root / utterance.path, samples)
            key = "/".join(utterance.path.split("/")[:2])
            seconds[key] = seconds.get(key, 0.0) + len(samples) / SAMPLE_RATE
            bar.update(1)
        bar.close()

    _write_transcripts(root, ls_utterances)
    corpus.lexicon.write_text("".join(f"{word}\t{' '.join(phones)}\n" for word, phones in sorted(lexicon.items())))
    write_phone_vocab(corpus.phone_vocab)
    corpus.voxceleb1_split.write_text("".join(line + "\n" for line in split_lines))
    manifest = {
        "format": CORPUS_FORMAT,
        "generator": "upstream_compressed.embedded.synth_corpus (espeak-ng en-us via espeakng-loader)",
        "options": asdict(options),
        "sample_rate": SAMPLE_RATE,
        "phone_set": "ARPAbet (CMUdict) with lexical stress; phoneme.txt is the 71-token SUPERB vocabulary",
        "hours": {key: round(value / 3600.0, 4) for key, value in sorted(seconds.items())},
        "hours_total": round(sum(seconds.values()) / 3600.0, 4),
        "librispeech": {
            "utterances": len(ls_utterances),
            "speakers": [{"id": s.id, "split": s.split, **asdict(s.voice)} for s in ls_speakers],
        },
        "voxceleb1": {
            "utterances": len(vox_utterances),
            "speakers": [{"id": s.id, "folder": s.split, **asdict(s.voice)} for s in vox_speakers],
        },
        "words": len(WORDS),
        "phones_used": sorted({p for phones in lexicon.values() for p in phones}),
    }
    corpus.manifest.write_text(json.dumps(manifest, indent=1) + "\n")  # last: its presence means "complete"
    return corpus


def _write_transcripts(root: Path, utterances: list[Utterance]) -> None:
    chapters: dict[Path, list[str]] = {}
    for utterance in utterances:
        path = root / utterance.path
        speaker_chapter = path.stem.rsplit("-", 1)[0]
        lines = chapters.setdefault(path.with_name(f"{speaker_chapter}.trans.txt"), [])
        lines.append(f"{path.stem} {' '.join(w.upper() for w in utterance.words)}\n")
    for trans_file, lines in chapters.items():
        trans_file.write_text("".join(lines))
