"""LibriSpeech phone recognition for s3prl's ``-d ctc`` (``corpus.name: libriphone``).

s3prl's ``downstream/ctc/data.py`` builds it as
``LibriPhoneDataset(split_dirs, tokenizer, bucket_size, **corpus_config)``, where the corpus
config holds ``path`` (the LibriSpeech root), ``lexicon`` (one file or a list), ``train``/``dev``/
``test`` (split folder names) and loader options that are ignored here. Items are
``(flac_path, token_ids)``, or a list of ``bucket_size`` such pairs of similar length when
bucketing; ``data.py``'s collate function reads the audio.

On disk (the LibriSpeech layout): ``{path}/{split}/**/{spk}-{chapter}-{utt}.flac`` with
``{spk}-{chapter}.trans.txt`` beside them (lines ``ID WORD WORD ...``); a lexicon has lines
``WORD<TAB>PH PH ...`` (any whitespace works); the tokenizer's vocabulary is one phone per line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from torch.utils.data import Dataset

logger = logging.getLogger(__name__)


class PhoneTokenizer(Protocol):
    """What this dataset needs from s3prl's ``WordTextEncoder``."""

    _vocab2idx: dict[str, int]

    def encode(self, s: str) -> list[int]: ...


class CorpusError(ValueError):
    """A libriphone corpus file is missing or malformed; the message names the file."""


def _as_list(value: str | os.PathLike | Sequence[str | os.PathLike], what: str) -> list[str]:
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    items = [os.fspath(v) for v in value]
    if not items:
        raise CorpusError(f"libriphone: '{what}' is empty; give at least one entry")
    return items


def read_lexicon(paths: Iterable[str | os.PathLike], vocab: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Read lexicon files into ``WORD -> phones``; the first pronunciation of a word wins.

    Taking the first one (over files in the given order) keeps targets deterministic, as SUPERB does.
    With ``vocab``, every phone must be in it (otherwise s3prl would silently map it to ``<unk>``).
    """
    vocab_set = set(vocab) if vocab is not None else None
    lexicon: dict[str, list[str]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise CorpusError(
                f"libriphone: lexicon file {path} does not exist (cwd {os.getcwd()}); "
                "set downstream_expert.corpus.lexicon to existing files"
            )
        with path.open(encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                fields = line.split()
                if not fields:
                    continue
                word, phones = fields[0], fields[1:]
                if not phones:
                    raise CorpusError(f"libriphone: {path}:{number}: word {word!r} has no phones")
                if vocab_set is not None:
                    unknown = [p for p in phones if p not in vocab_set]
                    if unknown:
                        raise CorpusError(
                            f"libriphone: {path}:{number}: phones {unknown} of {word!r} are not in the "
                            "phone vocabulary (downstream_expert.text.vocab_file)"
                        )
                lexicon.setdefault(word, phones)
    if not lexicon:
        raise CorpusError(f"libriphone: the lexicon files {[str(p) for p in paths]} hold no entries")
    return lexicon


def read_transcripts(trans_file: Path) -> dict[str, str]:
    """Read one ``{spk}-{chapter}.trans.txt``: utterance ID -> words."""
    transcripts: dict[str, str] = {}
    with trans_file.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            line = line.strip()
            if not line:
                continue
            utt_id, _, words = line.partition(" ")
            if not words.strip():
                raise CorpusError(f"libriphone: {trans_file}:{number}: utterance {utt_id} has no words")
            transcripts[utt_id] = words.strip()
    return transcripts


def transcript_file(flac: Path) -> Path:
    """``.../103-1240-0000.flac`` -> ``.../103-1240.trans.txt``."""
    speaker_chapter = flac.stem.rsplit("-", 1)[0]
    return flac.with_name(f"{speaker_chapter}.trans.txt")


def find_utterances(root: str | os.PathLike, splits: Sequence[str]) -> list[Path]:
    """All ``.flac`` files under ``{root}/{split}`` for each split, sorted."""
    files: list[Path] = []
    for split in splits:
        split_dir = Path(root) / split
        found = sorted(split_dir.rglob("*.flac"))
        if not found:
            reason = "does not exist" if not split_dir.is_dir() else "holds no .flac files"
            raise CorpusError(
                f"libriphone: {split_dir} {reason}; set downstream_expert.corpus.path to the "
                "LibriSpeech root and train/dev/test to its split folders (e.g. ['train-clean-100'])"
            )
        files += found
    return files


def phonemize(words: str, lexicon: dict[str, list[str]], *, where: str) -> list[str]:
    """Words -> phones through the lexicon; ``where`` names the utterance in the error."""
    phones: list[str] = []
    for word in words.split():
        pronunciation = lexicon.get(word)
        if pronunciation is None:
            raise CorpusError(
                f"libriphone: word {word!r} of {where} is not in the lexicon; "
                "add it to one of the downstream_expert.corpus.lexicon files"
            )
        phones += pronunciation
    return phones


class LibriPhoneDataset(Dataset):
    """LibriSpeech utterances with phone targets, sorted by target length for bucketing."""

    def __init__(
        self,
        split: str | Sequence[str],
        tokenizer: PhoneTokenizer,
        bucket_size: int,
        path: str | os.PathLike,
        lexicon: str | os.PathLike | Sequence[str | os.PathLike],
        ascending: bool = False,
        **kwargs: Any,  # s3prl passes the whole corpus config (train/dev/test, num_workers, ratio, ...)
    ) -> None:
        self.bucket_size = max(1, int(bucket_size))
        splits = _as_list(split, "train/dev/test split")
        vocab = getattr(tokenizer, "_vocab2idx", None)
        word2phones = read_lexicon(_as_list(lexicon, "lexicon"), vocab.keys() if vocab else None)

        transcripts: dict[Path, dict[str, str]] = {}
        pairs: list[tuple[str, list[int]]] = []
        for flac in find_utterances(path, splits):
            trans_path = transcript_file(flac)
            if trans_path not in transcripts:
                if not trans_path.is_file():
                    raise CorpusError(
                        f"libriphone: {flac} has no transcript file {trans_path.name} beside it"
                    )
                transcripts[trans_path] = read_transcripts(trans_path)
            words = transcripts[trans_path].get(flac.stem)
            if words is None:
                raise CorpusError(f"libriphone: utterance {flac.stem} is not listed in {trans_path}")
            phones = phonemize(words, word2phones, where=f"utterance {flac.stem} ({trans_path})")
            pairs.append((str(flac), tokenizer.encode(" ".join(phones))))

        # Longest targets first (s3prl's order) so that a bucket holds utterances of similar length;
        # the path breaks ties so the order never depends on the file system.
        pairs.sort(key=lambda pair: (len(pair[1]) if ascending else -len(pair[1]), pair[0]))
        self.file_list: tuple[str, ...] = tuple(p for p, _ in pairs)
        self.text: tuple[list[int], ...] = tuple(t for _, t in pairs)
        logger.info("libriphone: %d utterances from %s", len(self.file_list), splits)

    def __len__(self) -> int:
        return len(self.file_list)

    def __getitem__(self, index: int) -> tuple[str, list[int]] | list[tuple[str, list[int]]]:
        if self.bucket_size == 1:
            return self.file_list[index], self.text[index]
        # A bucket of consecutive (similar-length) utterances starting at ``index``; buckets near the
        # end are shifted back so that each one is full, as in s3prl's LibriSpeech corpora.
        start = max(0, min(index, len(self.file_list) - self.bucket_size))
        stop = start + self.bucket_size
        return list(zip(self.file_list[start:stop], self.text[start:stop]))
