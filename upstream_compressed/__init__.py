"""upstream_compressed: compressed Transformer speech upstreams for S3PRL.

Importing this package is cheap: it does not import S3PRL or torch. Call :func:`register` to add
the upstream entries (``hubert_headpruned``, ``compressed_local``, ...) to ``s3prl.hub``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .embedded import bundled_checkpoint  # noqa: E402  (cheap: no torch)

__all__ = ["bundled_checkpoint", "register"]


def register() -> list[str]:
    """Add every upstream entry of this plugin to ``s3prl.hub`` and return their names."""
    from . import s3prl_compat

    s3prl_compat.apply()
    import s3prl.hub

    from .hubconf import entries

    names = []
    for name, function in entries().items():
        setattr(s3prl.hub, name, function)
        names.append(name)
    return names
