"""S3PRL ``-o`` strings (its ``,,``-joined syntax) that point the PR and SID downstream configs at data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PathLike = str | os.PathLike


def ctc_override(librispeech: PathLike, lexicon: PathLike, vocab: PathLike) -> str:
    """For ``-d ctc`` with a libriphone config: LibriSpeech root, lexicon, phone vocabulary."""
    return ",,".join([
        f"config.downstream_expert.corpus.path={librispeech}",
        f"config.downstream_expert.corpus.lexicon={lexicon}",
        f"config.downstream_expert.text.vocab_file={vocab}",
    ])


def voxceleb1_override(voxceleb1: PathLike, split: PathLike) -> str:
    """For ``-d voxceleb1``: the data root and its ``iden_split.txt``."""
    return ",,".join([
        f"config.downstream_expert.datarc.file_path={voxceleb1}",
        f"config.downstream_expert.datarc.meta_data={split}",
    ])


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
