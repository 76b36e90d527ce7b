"""Speech corpora that s3prl's PyPI package lacks.

``libriphone``: the LibriSpeech phone-recognition dataset for s3prl's ``-d ctc``
(``s3prl_compat.apply()`` serves this package as ``s3prl.downstream.ctc.corpus``).

``phoneme.txt`` beside this file is the ARPAbet phone vocabulary (CMUdict phones with lexical
stress, plus ``SIL`` and ``SPN``), one token per line, for ``downstream_expert.text.vocab_file``.
"""

from __future__ import annotations

from pathlib import Path

# CMUdict's 15 vowels carry a stress digit (0, 1, 2); its 24 consonants do not.
ARPABET_VOWELS = (
    "AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW",
)
ARPABET_CONSONANTS = (
    "B", "CH", "D", "DH", "F", "G", "HH", "JH", "K", "L", "M", "N", "NG",
    "P", "R", "S", "SH", "T", "TH", "V", "W", "Y", "Z", "ZH",
)


def arpabet_phones() -> list[str]:
    """The 71-token phone vocabulary: ``SIL``, ``SPN``, then every phone in alphabetical order."""
    phones = [f"{v}{stress}" for v in ARPABET_VOWELS for stress in "012"] + list(ARPABET_CONSONANTS)
    return ["SIL", "SPN"] + sorted(phones)


PHONE_VOCAB = Path(__file__).with_name("phoneme.txt")
"""The packaged vocabulary file (the same tokens as :func:`arpabet_phones`)."""


def write_phone_vocab(path: str | Path, phones: list[str] | None = None) -> Path:
    """Write a phone vocabulary, one token per line (no blank lines: s3prl would read one as a token)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(phones if phones is not None else arpabet_phones()) + "\n")
    return path
