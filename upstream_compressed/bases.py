"""Where base checkpoints come from: a local path, or a name S3PRL knows how to download."""

from __future__ import annotations

import os
from pathlib import Path

from .embedded import BUNDLED, bundled_checkpoint
from .model.convert import DISTILLER_FORMAT, HUBERT_FORMAT, MELHUBERT_FORMAT, TORCHAUDIO_FORMAT

# S3PRL's own download locations for the bases we support by name (converted formats, no fairseq).
KNOWN_BASES = {
    "hubert_base": "https://huggingface.co/s3prl/converted_ckpts/resolve/main/hubert_base_ls960.pt",
    "hubert_large_ll60k": "https://huggingface.co/s3prl/converted_ckpts/resolve/main/hubert_large_ll60k.pt",
    "distilhubert_base": "https://huggingface.co/leo19941227/distilhubert/resolve/main/distilhubert_ls960_4-8-12.ckpt",
    # wav2vec 2.0 Base (LibriSpeech 960 h), as S3PRL's wav2vec2 / wav2vec2_base_960 download it.
    "wav2vec2": "https://huggingface.co/s3prl/converted_ckpts/resolve/main/wav2vec_small.pt",
    # WavLM, as S3PRL's wavlm_base / wavlm_base_plus / wavlm_large download it.
    "wavlm_base": "https://huggingface.co/s3prl/converted_ckpts/resolve/main/wavlm_base.pt",
    "wavlm_base_plus": "https://huggingface.co/s3prl/converted_ckpts/resolve/main/wavlm_base_plus.pt",
    "wavlm_large": "https://huggingface.co/s3prl/converted_ckpts/resolve/main/wavlm_large.pt",
}
KNOWN_BASES["distilhubert"] = KNOWN_BASES["distilhubert_base"]

# The upstream-name prefix of each checkpoint layout. torchaudio's wav2vec2 layout is DPHuBERT's (a HuBERT-family
# model whose hidden states follow DPHuBERT's extract_features): dphubert_local, dphubert_headpruned, ...
FAMILY_OF_FORMAT = {HUBERT_FORMAT: "hubert", DISTILLER_FORMAT: "distilhubert", MELHUBERT_FORMAT: "melhubert",
                    TORCHAUDIO_FORMAT: "dphubert", "s3prl_wavlm": "wavlm", "s3prl_wav2vec2": "wav2vec2"}
# The upstream that runs a base checkpoint of each layout as it is (S3PRL's own, or ours for MelHuBERT and DPHuBERT).
LOCAL_UPSTREAM_OF_FORMAT = {HUBERT_FORMAT: "hubert_local", DISTILLER_FORMAT: "distiller_local",
                            MELHUBERT_FORMAT: "melhubert_local", TORCHAUDIO_FORMAT: "dphubert_local",
                            "s3prl_wavlm": "wavlm_local", "s3prl_wav2vec2": "wav2vec2_local"}


def download_known_base(name: str, refresh: bool = False) -> Path:
    """Download (or find in S3PRL's cache) a known base by S3PRL's own download path; needs network."""
    from . import s3prl_compat

    s3prl_compat.apply()
    from s3prl.util.download import _urls_to_filepaths

    try:
        return Path(_urls_to_filepaths(KNOWN_BASES[name], refresh=refresh))
    except Exception as error:  # network errors come in many types
        raise FileNotFoundError(
            f"could not download base {name!r} from {KNOWN_BASES[name]} ({error}); without network, "
            "download it elsewhere and pass its local path instead"
        ) from error


def resolve_base(spec: str, relative_to: str | os.PathLike | None = None, refresh: bool = False) -> Path:
    """A base given as a path (relative to ``relative_to``) or a known name -> a local file."""
    path = Path(os.path.expandvars(os.path.expanduser(spec)))
    if not path.is_absolute() and relative_to is not None:
        candidate = Path(relative_to) / path
        if candidate.exists():
            path = candidate
    if path.is_file():
        return path.resolve()
    if spec in BUNDLED:
        return bundled_checkpoint(spec)
    if spec in KNOWN_BASES:
        return download_known_base(spec, refresh)
    raise FileNotFoundError(
        f"base {spec!r} is neither an existing file nor a known name ({', '.join(sorted([*KNOWN_BASES, *BUNDLED]))})"
    )
