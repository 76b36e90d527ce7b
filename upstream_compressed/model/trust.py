"""What a base checkpoint may unpickle, and how a user opts in to anything more.

Base checkpoints come from the internet, and a pickle can run any code while it loads. So every base
is read with ``torch.load(weights_only=True)``, which builds only tensors, plain containers and the
classes allow-listed here: exactly those that real S3PRL, fairseq-converted, distiller and MelHuBERT
checkpoints hold (checked by writing them with the code of S3PRL and MelHuBERT, see
``tests/test_safe_loading.py``):

- S3PRL's converted HuBERT (``s3prl.upstream.hubert.convert``): ``task_cfg``/``model_cfg`` are plain
  dicts (``OmegaConf.to_container``), ``dictionaries_symbols`` lists of strings: nothing to allow.
- :class:`argparse.Namespace`: the ``Args`` (parsed command line) that S3PRL's pretrain runner
  (distiller checkpoints) and MelHuBERT's runner save, and S3PRL's downstream ``states-*.ckpt``.
- ``s3prl.optimizers.WarmupLinearSchedule``: S3PRL's ``Lamb``/``BertAdam`` optimizers (the
  ``AdamW_with_schedule`` of the distiller's pretraining config) keep their schedule object in every
  ``param_groups`` entry, so it is inside the ``Optimizer`` state a distiller checkpoint carries.
  Checkpoints written before S3PRL became a package (the official DistilHuBERT ones) name its
  module ``optimizers``; S3PRL's own distiller loader aliases that module for them, and so do we.
  The object is rebuilt as plain data (``__new__`` plus its ``__dict__``): no code of the file runs.

Anything else is refused (:class:`~.convert.UntrustedCheckpointError`) unless the user opts in with
``--trust-checkpoint`` (CLI), ``trust_checkpoint: true`` (an upstream's ``-g`` yaml) or
``UPSTREAM_COMPRESSED_TRUST_CHECKPOINT=1``; a trusted file that needs full unpickling is loaded
with a :class:`TrustedCheckpointWarning` naming it.
"""

from __future__ import annotations

import argparse
import os
import re
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator

TRUST_ENV = "UPSTREAM_COMPRESSED_TRUST_CHECKPOINT"
TRUST_OPTION = "trust_checkpoint"  # the key in an upstream's -g options yaml
TRUST_FLAG = "--trust-checkpoint"
# torch's own switch: torch.load calls that do not pass weights_only (S3PRL's loaders) unpickle fully.
TORCH_FULL_UNPICKLE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")

# Set for the duration of a command or an upstream build that the user opted in for.
_trusted: ContextVar[bool] = ContextVar("upstream_compressed_trust_checkpoint", default=False)


class TrustedCheckpointWarning(UserWarning):
    """A checkpoint the user trusts is being unpickled fully (it may run code)."""


def allowed_globals() -> list[Any]:
    """The allow-list for ``torch.serialization.safe_globals`` (see the module docstring for why each)."""
    from s3prl.optimizers import WarmupLinearSchedule

    return [
        argparse.Namespace,
        (WarmupLinearSchedule, "s3prl.optimizers.WarmupLinearSchedule"),
        (WarmupLinearSchedule, "optimizers.WarmupLinearSchedule"),
    ]


def env_trust() -> bool:
    """Whether ``UPSTREAM_COMPRESSED_TRUST_CHECKPOINT`` opts in (a value that is not a yes/no is refused)."""
    from .convert import CheckpointError  # convert imports this module at its top

    value = os.environ.get(TRUST_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise CheckpointError(
        f"{TRUST_ENV}={os.environ[TRUST_ENV]!r}: set it to 1 to trust base checkpoints, or 0 (or unset it)"
    )


def is_trusted(explicit: bool | None = None) -> bool:
    """Whether the user opted in: ``explicit``, or the command's or upstream's opt-in, or the environment."""
    return bool(explicit) or _trusted.get() or env_trust()


@contextmanager
def trusting(trusted: bool | None, *, inherit: bool = False) -> Iterator[None]:
    """Opt in to trusted loading inside the block when ``trusted``; otherwise change nothing.

    ``inherit`` also sets the environment variable for the block, so the processes a command starts
    (``experiment`` runs ``compress``, ``profile`` and ``run_downstream.py``) are trusted too.
    """
    if not trusted:
        yield
        return
    token = _trusted.set(True)
    before = os.environ.get(TRUST_ENV)
    if inherit:
        os.environ[TRUST_ENV] = "1"
    try:
        yield
    finally:
        _trusted.reset(token)
        if inherit:
            if before is None:
                os.environ.pop(TRUST_ENV, None)
            else:
                os.environ[TRUST_ENV] = before


@contextmanager
def full_unpickling_by_s3prl(enabled: bool) -> Iterator[None]:
    """Inside the block, S3PRL's own ``torch.load(path)`` calls unpickle fully when ``enabled``.

    For a trusted file handed to an S3PRL loader (``hubert_tiny -k``, ``profile -u hubert_local``):
    torch's documented environment switch only affects calls that do not pass ``weights_only``.
    """
    if not enabled:
        yield
        return
    before = os.environ.get(TORCH_FULL_UNPICKLE_ENV)
    os.environ[TORCH_FULL_UNPICKLE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TORCH_FULL_UNPICKLE_ENV, None)
        else:
            os.environ[TORCH_FULL_UNPICKLE_ENV] = before


def refused_global(message: str) -> str | None:
    """What torch's weights-only unpickler refused to build, from its error message; None for other errors.

    A global's dotted name when torch gives it; None when the file is simply no pickle it can read.
    """
    for pattern in (r"GLOBAL (\S+) was not an allowed global", r"unsupported GLOBAL (\S+) whose module"):
        match = re.search(pattern, message)
        if match:
            return match.group(1)
    detail = re.search(r"WeightsUnpickler error: (.*(?:allowlisted|unrecognized function).*)", message)
    return detail.group(1).strip() if detail else None


def refusal_message(path: str | os.PathLike, found: str) -> str:
    """Why ``path`` is not loaded and the three ways to opt in."""
    return (
        f"base checkpoint {Path(path)} pickles {found}, which is not among the classes that S3PRL, "
        f"fairseq-converted, distiller and MelHuBERT checkpoints hold; unpickling it could run code "
        f"from the file, so it was not loaded. If you trust where it comes from, opt in with "
        f"{TRUST_FLAG} (upstream-compressed compress, analyse heads, profile, export, experiment), "
        f"`{TRUST_OPTION}: true` in the upstream's -g options yaml, or {TRUST_ENV}=1"
    )


def trusted_warning(path: str | os.PathLike, found: str) -> str:
    return (
        f"trusting base checkpoint {Path(path)} as asked: it pickles {found}, so it is unpickled fully, "
        "which runs any code it carries"
    )
