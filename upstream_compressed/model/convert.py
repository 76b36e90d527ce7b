"""Base checkpoint files <-> (ModelConfig, state_dict) of :class:`SpeechTransformer`.

Reading a file (weights-only, with the allow-list and opt-in of :mod:`.trust`) and the one dispatch over
the layouts of :mod:`.formats`, one module each: S3PRL's converted HuBERT (``hubert_local``), its
distiller (``distiller_local``), MelHuBERT's own (plus a mean/std file), torchaudio's wav2vec2 layout
(DPHuBERT's), and the others listed in :data:`.formats.FORMATS`. Tensors that only pre-training uses
are kept aside as ``extras`` so writing back gives a checkpoint S3PRL loads.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from . import formats
from .formats import distiller, hubert, melhubert, torchaudio
from .formats.common import Converted
from .trust import (
    TrustedCheckpointWarning,
    allowed_globals,
    is_trusted,
    refusal_message,
    refused_global,
    trusted_warning,
)

HUBERT_FORMAT, DISTILLER_FORMAT, MELHUBERT_FORMAT, TORCHAUDIO_FORMAT = (
    hubert.NAME, distiller.NAME, melhubert.NAME, torchaudio.NAME)


class CheckpointError(ValueError):
    """A base checkpoint that is missing, unreadable or in a format we do not know."""


class UntrustedCheckpointError(CheckpointError):
    """A base checkpoint that pickles more than :mod:`.trust` allows, loaded without an opt-in."""

    def __init__(self, path: str | os.PathLike, found: str) -> None:
        super().__init__(refusal_message(path, found))
        self.path, self.found = Path(path), found


def _weights_only_load(path: Path) -> tuple[Any, str | None]:
    """``(checkpoint, None)``, or ``(None, what torch refused)`` when it pickles more than :mod:`.trust` allows."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True), None
    except pickle.UnpicklingError as error:
        found = refused_global(str(error))
        if found is None:  # not an object it refused: a file that is no checkpoint
            raise
        return None, found


def _reason(error: Exception) -> str:
    """torch's error in one line (its weights-only messages wrap the reason in advice that does not apply)."""
    text = str(error).strip()
    match = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    return match.group(1).strip() if match else f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _require_trust(path: Path, found: str, trust: bool | None) -> None:
    """Refuse ``path`` unless the user opted in; warn, naming it, when they did."""
    if not is_trusted(trust):
        raise UntrustedCheckpointError(path, found)
    warnings.warn(trusted_warning(path, found), TrustedCheckpointWarning, stacklevel=3)


def load_checkpoint_file(path: str | os.PathLike, trust: bool | None = None) -> dict[str, Any]:
    """``torch.load`` a base checkpoint weights-only, with :mod:`.trust`'s allow-list.

    A file that needs more is refused (:class:`UntrustedCheckpointError`) before anything else is
    done, unless ``trust`` or an opt-in (:func:`.trust.is_trusted`) says to unpickle it fully.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"base checkpoint {path} does not exist (or is not a file)")
    is_trusted(trust)  # a malformed opt-in value is refused even for a plain file
    try:
        ckpt, found = _weights_only_load(path)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a file that is no checkpoint
        raise CheckpointError(f"cannot read base checkpoint {path} (is it a PyTorch checkpoint?): "
                              f"{_reason(error)}") from error
    if found is None:
        return ckpt
    _require_trust(path, found, trust)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - as above
        raise CheckpointError(f"cannot read base checkpoint {path}: {error}") from error


def check_checkpoint_file(path: str | os.PathLike, trust: bool | None = None) -> bool:
    """For a file that S3PRL's own loader will read: refuse it as :func:`load_checkpoint_file` would.

    True when it is trusted and needs full unpickling (run that loader in
    :func:`.trust.full_unpickling_by_s3prl`). A file torch cannot read at all is left to that loader.
    """
    is_trusted(trust)
    try:
        _, found = _weights_only_load(Path(path))
    except Exception:  # noqa: BLE001 - not a torch checkpoint: the loader reports its own error
        return False
    if found is None:
        return False
    _require_trust(Path(path), found, trust)
    return True


def detect_format(ckpt: dict[str, Any]) -> str:
    fmt = formats.detect(ckpt)
    if fmt is None:
        raise CheckpointError(
            f"unknown checkpoint format with keys {sorted(ckpt)[:8]}; expected one S3PRL's upstreams read: converted "
            "HuBERT or wav2vec 2.0 (task_cfg, model_cfg, model_weight), WavLM (cfg, model), the distiller (Config, "
            "Distiller), MelHuBERT's (model, Upstream_Config) or torchaudio's wav2vec2 layout (state_dict, config: "
            "DPHuBERT's). Convert a fairseq checkpoint with s3prl.upstream.<name>.convert first."
        )
    return fmt.NAME


def load_base(path: str | os.PathLike, mean_std: str | os.PathLike | None = None,
              trust: bool | None = None) -> Converted:
    """Read an S3PRL HuBERT or distiller checkpoint, or a MelHuBERT one, into our config and state dict.

    ``mean_std``: a MelHuBERT checkpoint's fbank statistics file; by default the one beside the
    checkpoint (``<stem>.mean-std.npy``, ``<stem>-mean-std.npy`` or ``mean-std.npy``).
    ``trust``: unpickle it fully if it needs more than :mod:`.trust` allows (else the user's opt-in decides).
    """
    ckpt = load_checkpoint_file(path, trust)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dictionary")
    fmt = detect_format(ckpt)
    if mean_std is not None and fmt != MELHUBERT_FORMAT:
        raise CheckpointError(f"{path} is a {fmt} checkpoint; a fbank mean/std file applies only to MelHuBERT")
    stats = mean_std if mean_std is not None else (melhubert.find_mean_std(path) if fmt == MELHUBERT_FORMAT else None)
    if fmt == MELHUBERT_FORMAT and stats is None:
        raise CheckpointError(
            f"MelHuBERT checkpoint {path} needs its fbank mean/std file (the .npy MelHuBERT's upstream "
            f"uses, e.g. libri-960-mean-std.npy): put it beside the checkpoint as "
            f"{Path(path).stem}.mean-std.npy or mean-std.npy, or name it with `mean_std:`"
        )
    try:
        converted = melhubert.read(ckpt, stats) if fmt == MELHUBERT_FORMAT else formats.by_name(fmt).read(ckpt)
    except (KeyError, ValueError, SyntaxError) as error:
        raise CheckpointError(f"{path}: malformed {fmt} checkpoint: {error}") from error
    # Half-precision storage (e.g. the bundled tiny HuBERT) runs in fp32, as S3PRL's loaders do.
    converted.state_dict = {k: v.float() if v.is_floating_point() else v for k, v in converted.state_dict.items()}
    return converted


def to_s3prl_checkpoint(converted: Converted) -> dict[str, Any]:
    """The inverse of :func:`load_base`: a dict that ``torch.save`` writes in the layout ``converted`` came from.

    Weight-pruning masks are left out: the weights are already zero where a mask prunes them, and
    the layouts have no place for masks (the file then runs dense in S3PRL's own upstreams).
    Structures a layout cannot express (per-layer shapes in S3PRL's classes, low-rank factors) are
    refused with the reason; conv-pruned front ends convert.
    """
    return formats.by_name(converted.source_format).write(converted)
