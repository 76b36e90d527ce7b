"""S3PRL's distiller checkpoints (``distiller_local``, DistilHuBERT): ``{"Config": {"distiller": {...}}, "Distiller": state}``."""

from __future__ import annotations

from typing import Any

from ..config import DISTILLER, ModelConfig
from .common import (Converted, dense_state, encoder_options, fairseq_renames, invert, pad_heads, parse_conv_layers,
                     rename, require_uniform, uniform_layers)

NAME = "s3prl_distiller"
DEFAULT_CONV = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"


def matches(ckpt: dict[str, Any]) -> bool:
    return "Distiller" in ckpt and "distiller" in ckpt.get("Config", {})


def renames(config: ModelConfig) -> dict[str, str]:
    """S3PRL key -> our key (the last prediction Linear is reshaped, not renamed: see :func:`read`)."""
    names = fairseq_renames(config.num_layers, len(config.conv_layers), config.extractor_mode)
    names["output_layer.0.weight"] = "prediction_heads.shared.weight"
    names["output_layer.0.bias"] = "prediction_heads.shared.bias"
    return names


def read(ckpt: dict[str, Any]) -> Converted:
    raw = dict(ckpt["Config"]["distiller"])
    get = raw.get
    if get("task_emb_type", "expand-last") != "expand-last" or get("out_layer_type", "expand-last") != "expand-last":
        raise ValueError("only DistilHuBERT's expand-last prediction heads are supported")
    if get("attention_type", "original") != "original":
        raise ValueError(f"attention_type {get('attention_type')!r} is not supported")
    dim = int(get("encoder_embed_dim", 768))
    head_dim, layers = uniform_layers(
        int(get("encoder_layers", 1)), dim, int(get("encoder_attention_heads", 12)),
        int(get("encoder_ffn_embed_dim", 3072)),
    )
    n_tasks = int(get("n_tasks", 12))
    inter_dim = int(get("out_layer_inter_dim", -1))
    config = ModelConfig(
        kind=DISTILLER,
        embed_dim=dim,
        head_dim=head_dim,
        layers=layers,
        conv_layers=parse_conv_layers(get("extractor_conv_feature_layers", DEFAULT_CONV)),
        extractor_mode=str(get("extractor_mode", "default")),
        conv_bias=False,
        **encoder_options(get),
        pred_layer_id=list(get("pred_layer_id", range(1, n_tasks + 1))),
        pred_inter_dim=inter_dim if inter_dim > 0 else dim,
        pred_out_dim=int(get("final_dim", 768)),
    )
    state, rest = rename(ckpt["Distiller"], renames(config))
    if "output_layer.2.weight" in rest:  # SplitLinear with several heads: (N, in, out) and (1, 1, N, out)
        state["prediction_heads.weight"] = rest.pop("output_layer.2.weight")
        state["prediction_heads.bias"] = rest.pop("output_layer.2.bias").reshape(n_tasks, -1)
    else:  # a single head is stored as a plain Linear
        state["prediction_heads.weight"] = rest.pop("output_layer.2.layer.weight").t()[None].contiguous()
        state["prediction_heads.bias"] = rest.pop("output_layer.2.layer.bias")[None]
    if rest:
        raise ValueError(f"unexpected distiller tensors {sorted(rest)[:5]}")
    return Converted(config, state, NAME, {"config": raw})


def write(converted: Converted) -> dict[str, Any]:
    config = converted.config
    config, state = pad_heads(config, dense_state(converted))  # S3PRL's attention is always embed_dim wide
    layer = require_uniform(config)
    back = invert(renames(config))
    n_tasks = len(config.pred_layer_id)
    weights = {back[key]: tensor for key, tensor in state.items() if key in back}
    if n_tasks > 1:
        weights["output_layer.2.weight"] = state["prediction_heads.weight"]
        weights["output_layer.2.bias"] = state["prediction_heads.bias"].reshape(1, 1, n_tasks, -1)
    else:
        weights["output_layer.2.layer.weight"] = state["prediction_heads.weight"][0].t().contiguous()
        weights["output_layer.2.layer.bias"] = state["prediction_heads.bias"][0]
    raw = dict(converted.extras.get("config", {}))
    raw.update(
        encoder_layers=config.num_layers,
        encoder_embed_dim=config.embed_dim,
        encoder_ffn_embed_dim=layer.ffn_dim,
        encoder_attention_heads=layer.num_heads,
        layer_norm_first=config.layer_norm_first,
        extractor_conv_feature_layers=repr(config.conv_layers),
        extractor_mode=config.extractor_mode,
        conv_pos=config.conv_pos,
        conv_pos_groups=config.conv_pos_groups,
        n_tasks=n_tasks,
        pred_layer_id=list(config.pred_layer_id),
        final_dim=config.pred_out_dim,
        out_layer_inter_dim=config.pred_inter_dim,
        task_emb_type="expand-last",
        out_layer_type="expand-last",
    )
    return {"Config": {"distiller": raw}, "Distiller": weights}
