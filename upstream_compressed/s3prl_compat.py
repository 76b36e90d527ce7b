"""Every shim that s3prl 0.4.18 needs on today's torch/torchaudio, in one place.

Call :func:`apply` before importing ``s3prl.hub`` or ``s3prl.downstream``. It is idempotent.
"""

from __future__ import annotations

import sys
import types

_applied = False


def _shim_torchaudio() -> None:
    """torchaudio >= 2.9 dropped ``set_audio_backend`` and ``sox_effects``, which ``import s3prl.hub`` touches."""
    import torchaudio

    if not hasattr(torchaudio, "set_audio_backend"):
        torchaudio.set_audio_backend = lambda backend=None: None
    if "torchaudio.sox_effects" not in sys.modules:
        try:
            import torchaudio.sox_effects  # noqa: F401
        except ImportError:
            module = types.ModuleType("torchaudio.sox_effects")

            def _unavailable(*args, **kwargs):
                raise RuntimeError(
                    "torchaudio.sox_effects is not available in this torchaudio; "
                    "this S3PRL code path needs an older torchaudio"
                )

            module.apply_effects_tensor = _unavailable
            module.apply_effects_file = _unavailable
            sys.modules["torchaudio.sox_effects"] = module
            torchaudio.sox_effects = module


def apply() -> None:
    """Install all shims (idempotent)."""
    global _applied
    if _applied:
        return
    _shim_torchaudio()
    _applied = True
