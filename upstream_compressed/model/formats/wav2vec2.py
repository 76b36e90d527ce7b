"""S3PRL's converted wav2vec 2.0 checkpoints (``wav2vec2_local``): ``{task_cfg, model_cfg, model_weight}``.

S3PRL's ``wav2vec2/convert.py`` writes fairseq's task and model configs as plain dicts and the whole
pre-training state dict; no ``dictionaries_symbols`` (HuBERT's converted files always have them). The
top-level keys are otherwise HuBERT's, so :func:`matches` looks inside: fairseq names the model config
``_name: wav2vec2`` (HuBERT's is ``hubert``); a config without the name is wav2vec 2.0 when its weights
hold ``project_q``, which every ``Wav2Vec2Model`` has and no ``HubertModel`` has.

The network is HuBERT's (conv front end, feature LayerNorm, projection, positional conv, post- or
pre-LN encoder) and S3PRL's expert reports the same hidden states (a hook on every layer's input, then
the encoder's output), so the model is of kind ``hubert``. One thing differs: wav2vec 2.0's model marks
padded frames by the conv length arithmetic, not HuBERT's equal chunks of the sample mask
(``conv_length_padding``). The quantizer, ``project_q``, ``final_proj`` and ``mask_emb`` are only for
pre-training; they stay in ``extras["pretraining_weights"]`` so :func:`write` gives a file S3PRL loads.
"""

from __future__ import annotations

from typing import Any

from ..config import HUBERT, ModelConfig
from . import hubert  # Wav2Vec2Config's fields and defaults for the encoder are HubertConfig's
from .common import (
    Converted,
    dense_state,
    fairseq_model_fields,
    fairseq_renames,
    invert,
    pad_heads,
    rename,
    require_uniform,
)

NAME = "s3prl_wav2vec2"
MODEL_NAME = "wav2vec2"  # fairseq's registry name, in the model config's ``_name``
# Tensors of Wav2Vec2Model that its upstream never runs (``target_glu`` only with that option).
PRETRAINING_PREFIXES = ("quantizer.", "project_q.", "final_proj.", "mask_emb", "target_glu.")


def matches(ckpt: dict[str, Any]) -> bool:
    if not all(isinstance(ckpt.get(key), dict) for key in ("task_cfg", "model_cfg", "model_weight")):
        return False
    name = ckpt["model_cfg"].get("_name")
    if name is not None:
        return name == MODEL_NAME
    return "project_q.weight" in ckpt["model_weight"]


def renames(config: ModelConfig) -> dict[str, str]:
    """S3PRL key -> our key (HuBERT's names: the two models share fairseq's module tree)."""
    names = fairseq_renames(config.num_layers, len(config.conv_layers), config.extractor_mode)
    names["layer_norm.weight"], names["layer_norm.bias"] = "feature_norm.weight", "feature_norm.bias"
    return names


def _refuse_unsupported(model_cfg: dict[str, Any]) -> None:
    """Options of Wav2Vec2Config that change what the upstream computes and our model does not do."""
    get = model_cfg.get
    if get("layer_type", "transformer") != "transformer":
        raise ValueError(f"layer_type {get('layer_type')!r} (wav2vec 2.0 conformer) is not supported")
    if get("pos_conv_depth", 1) != 1:
        raise ValueError("multi-layer positional convolutions (pos_conv_depth > 1) are not supported")
    if get("quantize_input", False):
        raise ValueError("quantize_input (the encoder reads quantized features) is not supported")
    if get("crop_seq_to_multiple", 1) != 1:
        raise ValueError("crop_seq_to_multiple > 1 (frames cropped before the encoder) is not supported")


def read(ckpt: dict[str, Any]) -> Converted:
    model_cfg, task_cfg = dict(ckpt["model_cfg"]), dict(ckpt["task_cfg"])
    _refuse_unsupported(model_cfg)
    config = hubert.model_config(model_cfg, task_cfg, conv_length_padding=True)
    state, rest = rename(ckpt["model_weight"], renames(config))
    unknown = sorted(key for key in rest if not key.startswith(PRETRAINING_PREFIXES))
    if unknown:  # a tensor the upstream uses that we would silently drop
        raise ValueError(f"unexpected wav2vec 2.0 tensors {unknown[:5]}")
    extras = {"task_cfg": task_cfg, "model_cfg": model_cfg, "pretraining_weights": rest}
    return Converted(config, state, NAME, extras)


def _quantizer_width(weights: dict[str, Any]) -> int | None:
    """The conv feature width the pre-training tensors were built for (None: none of them reads it)."""
    for key in ("quantizer.weight_proj.weight", "quantizer.weight_proj.0.weight"):
        if key in weights:
            return int(weights[key].shape[1])
    return None


def write(converted: Converted) -> dict[str, Any]:
    """S3PRL's converted wav2vec 2.0 file of ``converted``; pruned heads are written back as zero heads.

    Refused (ValueError, saying why): FFN widths that differ per layer, low-rank factors, removed sublayers,
    a conv-pruned front end (the pre-training quantizer reads the conv width), or a non-wav2vec 2.0 model.
    """
    config = converted.config
    if config.kind != HUBERT or not config.conv_length_padding or config.pred_layer_id or config.feature_scale:
        raise ValueError("only a wav2vec 2.0 model (hubert kind with conv_length_padding, no prediction heads or "
                         "feature scale) can be written in S3PRL's wav2vec 2.0 layout")
    if not config.feature_layer_norm:
        raise ValueError("S3PRL's wav2vec 2.0 always has the feature LayerNorm; this model has none")
    config, state = pad_heads(config, dense_state(converted))
    layer = require_uniform(config)
    pretraining = dict(converted.extras.get("pretraining_weights", {}))
    if "project_q.weight" not in pretraining:  # S3PRL's class builds and strictly loads these
        raise ValueError("S3PRL's wav2vec 2.0 class needs the pre-training tensors (quantizer, project_q, "
                         "final_proj, mask_emb) of the base this model was read from; they are missing")
    width = _quantizer_width(pretraining)
    if width is not None and width != config.conv_dim:
        raise ValueError(
            f"the front end's last conv layer has {config.conv_dim} channels but wav2vec 2.0's quantizer (used in "
            f"pre-training only) reads {width}; S3PRL's class builds it from the conv width, so a conv-pruned "
            "wav2vec 2.0 is only loadable as a delta through compressed_local"
        )
    back = invert(renames(config))
    weights = {back[key]: tensor for key, tensor in state.items()}
    weights.update(pretraining)
    model_cfg = dict(converted.extras.get("model_cfg", {}))
    model_cfg.setdefault("_name", MODEL_NAME)  # what :func:`matches` reads first
    model_cfg.update(fairseq_model_fields(config, layer))
    task_cfg = dict(converted.extras.get("task_cfg", {"sample_rate": 16000}))
    task_cfg["normalize"] = config.normalize_waveform
    return {"task_cfg": task_cfg, "model_cfg": model_cfg, "model_weight": weights}
