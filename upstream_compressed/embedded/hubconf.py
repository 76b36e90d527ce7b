"""``-u hubert_tiny``: S3PRL's own HuBERT upstream (``hubert_local``) on the bundled tiny HuBERT.

``upstream_compressed.hubconf.entries()`` merges :func:`entries` so that ``register()`` adds it to
``s3prl.hub``. ``-k`` may name another checkpoint in the same format (e.g. one you pretrained).
"""

from __future__ import annotations

from typing import Any, Callable

from . import bundled_checkpoint


def hubert_tiny(ckpt: str | None = None, model_config: str | None = None, refresh: bool = False, **kwargs: Any):
    """The tiny HuBERT pretrained on the embedded espeak-ng corpus (about 3.6 M parameters, 5 hidden states)."""
    from s3prl.upstream.hubert.hubconf import hubert_local

    return hubert_local(ckpt=str(ckpt or bundled_checkpoint("tiny_hubert")), refresh=refresh, **kwargs)


def entries() -> dict[str, Callable[..., Any]]:
    """The upstream entries of the embedded default, by name."""
    return {"hubert_tiny": hubert_tiny}
