"""S3PRL's converted HuBERT checkpoints (``hubert_local``): ``{task_cfg, model_cfg, model_weight, dictionaries_symbols}``.

Tensors that only pre-training uses (``final_proj``, ``label_embs_concat``, ``mask_emb``) are kept aside
in ``extras["pretraining_weights"]`` so :func:`write` gives back a file S3PRL loads.
"""

from __future__ import annotations

from typing import Any

from ..config import HUBERT, ModelConfig
from .common import (Converted, dense_state, fairseq_model_fields, fairseq_renames, invert, pad_heads,
                     parse_conv_layers, rename, require_uniform, uniform_layers)

NAME = "s3prl_hubert"


def matches(ckpt: dict[str, Any]) -> bool:
    return all(key in ckpt for key in ("task_cfg", "model_cfg", "model_weight"))


def defaults() -> dict[str, Any]:
    """The HubertConfig fields we read, with fairseq's defaults (checkpoints may omit any of them)."""
    return {
        "extractor_mode": "default",
        "encoder_layers": 12,
        "encoder_embed_dim": 768,
        "encoder_ffn_embed_dim": 3072,
        "encoder_attention_heads": 12,
        "activation_fn": "gelu",
        "layer_type": "transformer",
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "layer_norm_first": False,
        "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
        "conv_bias": False,
        "conv_pos": 128,
        "conv_pos_groups": 16,
        "pos_conv_depth": 1,
    }


def renames(config: ModelConfig) -> dict[str, str]:
    """S3PRL key -> our key."""
    names = fairseq_renames(config.num_layers, len(config.conv_layers), config.extractor_mode)
    names["layer_norm.weight"], names["layer_norm.bias"] = "feature_norm.weight", "feature_norm.bias"
    return names


def model_config(model_cfg: dict[str, Any], task_cfg: dict[str, Any], **more: Any) -> ModelConfig:
    """Our config of fairseq's HubertConfig fields (wav2vec 2.0's Wav2Vec2Config shares them); ``more`` adds fields."""
    base = defaults()
    cfg = {**base, **{k: v for k, v in model_cfg.items() if k in base}}
    if cfg.get("layer_type", "transformer") != "transformer":
        raise ValueError(f"layer_type {cfg['layer_type']!r} (conformer) is not supported")
    if cfg.get("pos_conv_depth", 1) != 1:
        raise ValueError("multi-layer positional convolutions (pos_conv_depth > 1) are not supported")
    head_dim, layers = uniform_layers(
        cfg["encoder_layers"], cfg["encoder_embed_dim"], cfg["encoder_attention_heads"], cfg["encoder_ffn_embed_dim"]
    )
    return ModelConfig(
        kind=HUBERT,
        embed_dim=cfg["encoder_embed_dim"],
        head_dim=head_dim,
        layers=layers,
        conv_layers=parse_conv_layers(cfg["conv_feature_layers"]),
        extractor_mode=cfg["extractor_mode"],
        conv_bias=bool(cfg["conv_bias"]),
        conv_pos=cfg["conv_pos"],
        conv_pos_groups=cfg["conv_pos_groups"],
        layer_norm_first=bool(cfg["layer_norm_first"]),
        feature_layer_norm=True,
        normalize_waveform=bool(task_cfg.get("normalize", False)),
        activation=cfg["activation_fn"],
        dropout=cfg["dropout"],
        attention_dropout=cfg["attention_dropout"],
        activation_dropout=cfg["activation_dropout"],
        **more,
    )


def read(ckpt: dict[str, Any]) -> Converted:
    model_cfg, task_cfg = dict(ckpt["model_cfg"]), dict(ckpt["task_cfg"])
    config = model_config(model_cfg, task_cfg)
    state, rest = rename(ckpt["model_weight"], renames(config))
    extras = {
        "task_cfg": task_cfg,
        "model_cfg": model_cfg,
        "dictionaries_symbols": ckpt.get("dictionaries_symbols"),
        "pretraining_weights": rest,  # mask_emb, final_proj, label_embs_concat: unused by upstreams
    }
    return Converted(config, state, NAME, extras)


def write(converted: Converted) -> dict[str, Any]:
    config = converted.config
    config, state = pad_heads(config, dense_state(converted))  # S3PRL's attention is always embed_dim wide
    layer = require_uniform(config)
    back = invert(renames(config))
    weights = {back[key]: tensor for key, tensor in state.items()}
    weights.update(converted.extras.get("pretraining_weights", {}))
    model_cfg = dict(converted.extras.get("model_cfg", {"label_rate": 50}))
    model_cfg.update(fairseq_model_fields(config, layer))
    task_cfg = dict(converted.extras.get("task_cfg", {"label_rate": 50, "sample_rate": 16000}))
    task_cfg["normalize"] = config.normalize_waveform
    return {
        "task_cfg": task_cfg,
        "model_cfg": model_cfg,
        "model_weight": weights,
        "dictionaries_symbols": converted.extras.get("dictionaries_symbols"),
    }
