"""espeak-ng's English phonemes -> ARPAbet, the phone set of SUPERB's LibriSpeech phone recognition.

The documented phone set is CMUdict's ARPAbet with lexical stress: 15 vowels, each with a stress digit
(0 unstressed, 1 primary, 2 secondary), and 24 consonants; the vocabulary file adds ``SIL`` and ``SPN``
(71 tokens, :func:`upstream_compressed.corpus.arpabet_phones`). A corpus made here uses a subset.

espeak-ng's ASCII phoneme names (``espeak_TextToPhonemes``, en-us voice) mark stress with ``'``
(primary) or ``,`` (secondary) before a syllable; the digit goes on the next vowel. Some espeak
phonemes are two ARPAbet phones (``A@`` in "car" is ``AA R``), as CMUdict writes those words; only
the first of them takes the stress digit. Allophones that CMUdict does not distinguish (flap ``t#``,
glottal stop ``?``) map to the phoneme CMUdict writes (``T``).
"""

from __future__ import annotations

from collections.abc import Sequence

STRESS_MARKS = {"'": "1", ",": "2"}
# espeak marks that carry no phone: syllable break, unstressed/extra-stress hints.
IGNORED_MARKS = ("%", "=", ";")

# espeak phoneme -> ARPAbet phones; vowels without a digit take one from the stress marks.
ESPEAK_TO_ARPABET: dict[str, tuple[str, ...]] = {
    # consonants
    "p": ("P",), "b": ("B",), "t": ("T",), "t2": ("T",), "t#": ("T",), "?": ("T",), "d": ("D",), "d#": ("D",),
    "k": ("K",), "g": ("G",), "f": ("F",), "v": ("V",), "T": ("TH",), "D": ("DH",), "s": ("S",), "z": ("Z",),
    "S": ("SH",), "Z": ("ZH",), "h": ("HH",), "tS": ("CH",), "dZ": ("JH",), "m": ("M",), "n": ("N",),
    "N": ("NG",), "l": ("L",), "r": ("R",), "r-": ("R",), "j": ("Y",), "w": ("W",), "W": ("W",),
    # syllabic consonants (CMUdict writes a schwa before them)
    "n-": ("AH", "N"), "m-": ("AH", "M"), "l-": ("AH", "L"), "@L": ("AH", "L"),
    # monophthongs
    "a": ("AE",), "aa": ("AE",), "a#": ("AH",), "A:": ("AA",), "0": ("AA",), "V": ("AH",),
    "@": ("AH",), "@2": ("AH",), "@5": ("AH",), "@-": ("AH",), "E": ("EH",), "E2": ("EH",), "e": ("EH",),
    "I": ("IH",), "I#": ("IH",), "I2": ("IH",), "i": ("IY",), "i:": ("IY",), "O": ("AO",), "O:": ("AO",),
    "O2": ("AO",), "U": ("UH",), "u:": ("UW",), "3": ("ER",), "3:": ("ER",),
    # diphthongs
    "aI": ("AY",), "aU": ("AW",), "eI": ("EY",), "oU": ("OW",), "OI": ("OY",),
    # r-coloured and centring vowels
    "A@": ("AA", "R"), "O@": ("AO", "R"), "o@": ("AO", "R"), "e@": ("EH", "R"), "i@3": ("IH", "R"),
    "U@": ("UH", "R"), "i@": ("IY", "AH"), "aI@": ("AY", "AH"), "aI3": ("AY", "ER"), "aU@": ("AW", "ER"),
    "aU3": ("AW", "ER"),
}

ARPABET_VOWELS = frozenset(
    ("AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW")
)


class PhoneMappingError(ValueError):
    """espeak-ng produced a phoneme this mapping does not know; the message names word and phoneme."""


def espeak_to_arpabet(tokens: Sequence[str], word: str = "?") -> list[str]:
    """One word's espeak phonemes (stress marks attached, e.g. ``["h", "@", "l", "'oU"]``) -> ARPAbet."""
    phones: list[str] = []
    stress = "0"
    for token in tokens:
        name = token
        while name and name[0] in STRESS_MARKS or name[:1] in IGNORED_MARKS:
            if name[0] in STRESS_MARKS:
                stress = STRESS_MARKS[name[0]]
            name = name[1:]
        if not name:
            continue  # a bare mark (e.g. ';' between syllables)
        mapped = ESPEAK_TO_ARPABET.get(name)
        if mapped is None:
            raise PhoneMappingError(
                f"espeak-ng phoneme {name!r} of word {word!r} ({' '.join(tokens)}) has no ARPAbet mapping; "
                "add it to ESPEAK_TO_ARPABET in upstream_compressed/embedded/phones.py or drop the word"
            )
        first_vowel = True
        for phone in mapped:
            if phone in ARPABET_VOWELS:
                phones.append(phone + (stress if first_vowel else "0"))
                first_vowel, stress = False, "0"
            else:
                phones.append(phone)
    if not phones:
        raise PhoneMappingError(f"word {word!r} has no phones ({tokens!r})")
    return phones
