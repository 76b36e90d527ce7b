"""``-u hubert_tiny``: S3PRL's own HuBERT upstream (``hubert_local``) on the bundled tiny HuBERT.

``upstream_compressed.hubconf.entries()`` merges :func:`entries` so that ``register()`` adds it to
``s3prl.hub``. ``-k`` may name another checkpoint in the same format (e.g. one you pretrained); it is
checked as every base is (:mod:`upstream_compressed.model.trust`) before S3PRL's loader reads it,
so one that pickles more than S3PRL's formats needs ``trust_checkpoint: true`` in the ``-g`` yaml.
"""

from __future__ import annotations

from typing import Any, Callable

from . import bundled_checkpoint


def hubert_tiny(ckpt: str | None = None, model_config: str | None = None, refresh: bool = False, **kwargs: Any):
    """The tiny HuBERT pretrained on the embedded espeak-ng corpus (about 3.6 M parameters, 5 hidden states)."""
    from s3prl.upstream.hubert.hubconf import hubert_local

    from ..delta import DeltaError
    from ..hubconf import compile_option, precision_option, trust_option
    from ..model.convert import CheckpointError, check_checkpoint_file
    from ..model.trust import full_unpickling_by_s3prl

    precision = precision_option(model_config)
    if precision != "fp32":  # S3PRL's own upstream runs as S3PRL builds it: nothing of ours wraps its forward
        raise DeltaError(f"hubert_tiny is S3PRL's own hubert_local on the bundled checkpoint and runs in fp32 only, "
                         f"not precision {precision}; for {precision}, make an identity delta of tiny_hubert "
                         "(`upstream-compressed compress` of a recipe with no steps) and use -u hubert_identity")
    if compile_option(model_config):
        raise DeltaError("hubert_tiny is S3PRL's own hubert_local on the bundled checkpoint and runs eagerly, as "
                         "S3PRL builds it; for compile: true, make an identity delta of tiny_hubert (`upstream-"
                         "compressed compress` of a recipe with no steps) and use -u hubert_identity")
    path = str(ckpt or bundled_checkpoint("tiny_hubert"))
    try:
        needs_full_unpickling = check_checkpoint_file(path, trust=trust_option(model_config))
    except CheckpointError as error:  # the error every upstream entry gives for a bad -k/-g
        raise DeltaError(str(error)) from error
    with full_unpickling_by_s3prl(needs_full_unpickling):
        return hubert_local(ckpt=path, refresh=refresh, **kwargs)


def entries() -> dict[str, Callable[..., Any]]:
    """The upstream entries of the embedded default, by name."""
    return {"hubert_tiny": hubert_tiny}
