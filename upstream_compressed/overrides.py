"""S3PRL ``-o`` strings (its ``,,``-joined syntax) that point the PR and SID downstream configs at data."""

from __future__ import annotations

import os

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
