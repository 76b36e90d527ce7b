"""Where the PR and SID downstream configs read their data, and S3PRL ``-o`` strings that set it.

S3PRL's ``-o`` joins options with ``,,``. The data fields of each task are listed once
(:data:`CTC_DATA`, :data:`VOXCELEB1_DATA`) with the environment variable that supplies each one
when ``run_downstream.py`` falls back to a bundled SUPERB config (:func:`complete_data_paths`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

PathLike = str | os.PathLike

# How the shipped SUPERB configs mark a path the user must set.
PLACEHOLDER_PREFIX = "/path/to/"

LIBRISPEECH_ENV = "LIBRISPEECH"
LIBRISPEECH_LEXICON_ENV = "LIBRISPEECH_LEXICON"
VOXCELEB1_ENV = "VOXCELEB1"
VOXCELEB1_SPLIT_NAME = "iden_split.txt"
# SUPERB PR's two lexicon files, as in S3PRL's ``downstream/ctc/lexicon/`` folder.
SUPERB_LEXICON_NAMES = ("librispeech-lexicon-200k-g2p.txt", "librispeech-lexicon-allothers-g2p.txt")


class DataPathError(ValueError):
    """A data path that cannot be used, with what to set instead."""


@dataclass(frozen=True)
class DataField:
    """One data path of a downstream config: its key under ``downstream_expert`` and what supplies it."""

    key: str  # dotted, e.g. "corpus.path"
    what: str  # for messages: what the path must be
    env: str | None = None  # the variable it comes from, if any
    env_suffix: str = ""  # ... as ``$env`` + this (VoxCeleb1's split file inside its root)

    @property
    def override_key(self) -> str:
        """The key as ``-o`` spells it."""
        return f"config.downstream_expert.{self.key}"

    def how_to_set(self) -> str:
        """The variable or ``-o`` key that sets this path."""
        option = f"-o {self.override_key}=PATH"
        if self.env is None:
            return f"give {option}"
        found = f" (the file ${self.env}{self.env_suffix} is used)" if self.env_suffix else ""
        return f"set {self.env}{found}, or give {option}"

    def get(self, config: Mapping[str, Any]) -> Any:
        node: Any = config.get("downstream_expert", {})
        for part in self.key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return node

    def set(self, config: dict[str, Any], value: Any) -> None:
        *parents, last = self.key.split(".")
        node = config.setdefault("downstream_expert", {})
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value


CTC_DATA = (
    DataField("corpus.path", "the LibriSpeech root (holding train-clean-100/, dev-clean/, test-clean/)",
              LIBRISPEECH_ENV),
    DataField("corpus.lexicon", "the lexicon (lines 'WORD PH PH ...'; SUPERB uses S3PRL's two g2p lexicons)",
              LIBRISPEECH_LEXICON_ENV),
    DataField("text.vocab_file", "the phone vocabulary (one phone per line)"),
)
VOXCELEB1_DATA = (
    DataField("datarc.file_path", "the VoxCeleb1 root (holding dev/wav/ and test/wav/)", VOXCELEB1_ENV),
    DataField("datarc.meta_data", f"VoxCeleb1's identification split ({VOXCELEB1_SPLIT_NAME})", VOXCELEB1_ENV,
              f"/{VOXCELEB1_SPLIT_NAME}"),
)
TASK_DATA: dict[str, tuple[DataField, ...]] = {"ctc": CTC_DATA, "voxceleb1": VOXCELEB1_DATA}


def data_override(fields: Sequence[DataField], values: Sequence[Any]) -> str:
    """``-o`` setting each field to its value, in order."""
    return ",,".join(f"{field.override_key}={value}" for field, value in zip(fields, values, strict=True))


def ctc_override(librispeech: PathLike, lexicon: PathLike, vocab: PathLike) -> str:
    """For ``-d ctc`` with a libriphone config: LibriSpeech root, lexicon, phone vocabulary."""
    return data_override(CTC_DATA, (librispeech, lexicon, vocab))


def voxceleb1_override(voxceleb1: PathLike, split: PathLike) -> str:
    """For ``-d voxceleb1``: the data root and its ``iden_split.txt``."""
    return data_override(VOXCELEB1_DATA, (voxceleb1, split))


# --------------------------------------------------------------------------------------------
# data paths from the environment (run_downstream.py without -c)
# --------------------------------------------------------------------------------------------


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def is_placeholder(value: Any) -> bool:
    """Unset, or (any item of a list) still a shipped config's ``/path/to/...`` placeholder."""
    return value is None or any(str(v).startswith(PLACEHOLDER_PREFIX) for v in _as_list(value))


def _absolute(path: str | Path) -> str:
    """Recorded configs outlive the working folder (``-m evaluate -e`` runs from anywhere)."""
    return os.path.abspath(os.path.expanduser(path))


def lexicon_files(value: str) -> str | list[str]:
    """``$LIBRISPEECH_LEXICON``: one file, several joined by ``os.pathsep``, or a folder with SUPERB's two."""
    parts = [part for part in value.split(os.pathsep) if part]
    if len(parts) == 1 and Path(parts[0]).is_dir():
        folder = Path(parts[0])
        missing = [name for name in SUPERB_LEXICON_NAMES if not (folder / name).is_file()]
        if missing:
            raise DataPathError(
                f"{LIBRISPEECH_LEXICON_ENV}={value} is a folder without SUPERB's lexicon files {missing}; "
                f"set {LIBRISPEECH_LEXICON_ENV} to the lexicon file itself (or several joined by '{os.pathsep}')"
            )
        parts = [str(folder / name) for name in SUPERB_LEXICON_NAMES]
    files = [_absolute(part) for part in parts]
    return files[0] if len(files) == 1 else files


@dataclass(frozen=True)
class Supplied:
    """A data path found without ``-o``, and where from (for messages)."""

    value: str | list[str]
    origin: str


def data_from_environment(downstream: str, environ: Mapping[str, str]) -> dict[DataField, Supplied]:
    """The data paths the environment supplies for ``-d ctc`` or ``-d voxceleb1``.

    ctc: ``$LIBRISPEECH``, ``$LIBRISPEECH_LEXICON`` (see :func:`lexicon_files`) and the phone
    vocabulary this package ships. voxceleb1: ``$VOXCELEB1`` and the ``iden_split.txt`` inside it.
    """
    from upstream_compressed.corpus import PHONE_VOCAB

    supplied: dict[DataField, Supplied] = {}
    for field in TASK_DATA[downstream]:
        if field.env is None:  # only the phone vocabulary: ours
            supplied[field] = Supplied(str(PHONE_VOCAB), "the phone vocabulary this package ships")
        elif environ.get(field.env):
            raw = environ[field.env]
            value = lexicon_files(raw) if field.env == LIBRISPEECH_LEXICON_ENV else _absolute(raw + field.env_suffix)
            supplied[field] = Supplied(value, f"${field.env}{field.env_suffix}")
    return supplied


def complete_data_paths(downstream: str, config: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Fill a bundled config's placeholder data paths from the environment; refuse what is still unusable.

    Values already set (by ``-o``) are kept. Returns one line per path filled in, for the log.
    Raises :class:`DataPathError` naming every path that is still a placeholder, with the variable
    or ``-o`` key that sets it, and every path that does not exist.
    """
    supplied = data_from_environment(downstream, environ)
    notes, problems = [], []
    for field in TASK_DATA[downstream]:
        value, origin = field.get(config), f"-o {field.override_key}"
        if is_placeholder(value) and field in supplied:
            value, origin = supplied[field].value, supplied[field].origin
            field.set(config, value)
            notes.append(f"{field.key} = {value}  (from {origin})")
        if is_placeholder(value):
            problems.append(f"{field.what} is not set: {field.how_to_set()}")
        elif missing := [str(v) for v in _as_list(value) if not Path(str(v)).exists()]:
            problems.append(f"{field.what}: {', '.join(missing)} (from {origin}) does not exist; {field.how_to_set()}")
    if problems:
        raise DataPathError(f"-d {downstream} cannot start, its data paths are not usable:\n  " + "\n  ".join(problems))
    return notes


@dataclass(frozen=True)
class CorpusPaths:
    """What PR and SID read from a corpus in S3PRL's LibriSpeech and VoxCeleb1 layouts."""

    root: Path
    librispeech: Path
    lexicon: Path
    phone_vocab: Path
    voxceleb1: Path
    voxceleb1_split: Path

    def ctc_override(self) -> str:
        """``-o`` for S3PRL's ``-d ctc`` with a libriphone config."""
        return ctc_override(self.librispeech, self.lexicon, self.phone_vocab)

    def voxceleb1_override(self) -> str:
        """``-o`` for S3PRL's ``-d voxceleb1``."""
        return voxceleb1_override(self.voxceleb1, self.voxceleb1_split)
