"""One module per checkpoint layout, behind one dispatch.

Each layout module has ``NAME`` (the ``source_format`` it reads), ``matches(ckpt)`` (whether a loaded
checkpoint dictionary is in this layout), ``read(ckpt, **options) -> Converted`` and
``write(converted) -> dict`` (what ``torch.save`` writes back in that layout). :func:`detect` tries
them in :data:`FORMATS` order: a layout whose keys another one shares must come before it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from . import distiller, hubert, melhubert, torchaudio, wav2vec2, wavlm
from .common import Converted

# wav2vec2 shares HuBERT's top-level keys and looks inside them, so it goes first.
FORMATS: tuple[ModuleType, ...] = (wav2vec2, hubert, distiller, melhubert, torchaudio, wavlm)


def detect(ckpt: dict[str, Any]) -> ModuleType | None:
    """The layout module that reads ``ckpt``, or None."""
    return next((fmt for fmt in FORMATS if fmt.matches(ckpt)), None)


def by_name(name: str) -> ModuleType:
    """The layout module whose ``NAME`` is ``name`` (a :class:`Converted`'s ``source_format``)."""
    for fmt in FORMATS:
        if fmt.NAME == name:
            return fmt
    raise ValueError(f"unknown checkpoint format {name!r}; known: {[fmt.NAME for fmt in FORMATS]}")


__all__ = ["Converted", "FORMATS", "by_name", "detect"]
