"""S3PRL's WavLM checkpoints (``wavlm_local``; UniSpeech-SAT's use the same class): ``{"cfg": {...}, "model": state_dict}``.

``cfg`` holds WavLMConfig's fields (missing ones take its defaults). The hidden states are HuBERT's
layout (kind ``hubert``): the input of every encoder layer, then the encoder's output (after the
final LayerNorm when pre-LN, as in WavLM Large).

Key names, S3PRL -> ours (besides the fairseq-style ones every layout shares, see
:func:`.common.fairseq_renames`):

=================================================================  ==========================================
``layer_norm.*`` (on the conv features)                            ``feature_norm.*``
``encoder.layers.0.self_attn.relative_attention_bias.weight``      ``relative_position_bias.weight``
  (buckets x heads; WavLM holds it in layer 0 and hands it on)       (model level, all original heads)
``encoder.layers.{i}.self_attn.grep_linear.*``                     ``layers.{i}.attention.gate.*``
``encoder.layers.{i}.self_attn.grep_a`` (1, H, 1, 1)               ``layers.{i}.attention.gate_scale`` (H,)
=================================================================  ==========================================

``mask_emb`` (pre-training only), and the gate tensors of a model whose gate is unused (``gru_rel_pos``
without ``relative_position_embedding``), are kept aside in ``extras`` so :func:`write` gives back a
file S3PRL loads.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from ..config import HUBERT, ModelConfig
from .common import (
    Converted,
    dense_state,
    fairseq_renames,
    invert,
    parse_conv_layers,
    rename,
    require_uniform,
    uniform_layers,
)

NAME = "s3prl_wavlm"
BIAS_KEY = "encoder.layers.0.self_attn.relative_attention_bias.weight"
LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.")


def defaults() -> dict[str, Any]:
    """The WavLMConfig fields we read, with its defaults (a checkpoint may omit any of them)."""
    return {
        "extractor_mode": "default",
        "encoder_layers": 12,
        "encoder_embed_dim": 768,
        "encoder_ffn_embed_dim": 3072,
        "encoder_attention_heads": 12,
        "activation_fn": "gelu",
        "layer_norm_first": False,
        "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
        "conv_bias": False,
        "normalize": False,
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "conv_pos": 128,
        "conv_pos_groups": 16,
        "relative_position_embedding": False,
        "num_buckets": 320,
        "max_distance": 1280,
        "gru_rel_pos": False,
    }


def matches(ckpt: dict[str, Any]) -> bool:
    """A flat WavLMConfig dictionary beside a state dict (fairseq's own files nest ``cfg["model"]``)."""
    cfg, model = ckpt.get("cfg"), ckpt.get("model")
    return (isinstance(cfg, dict) and isinstance(model, dict) and "model" not in cfg
            and ("encoder_embed_dim" in cfg or "encoder_layers" in cfg))


def _check_supported(raw: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Refuse, naming the field, what S3PRL's WavLM computes differently from our model (or ignores)."""
    if raw.get("layer_type", "transformer") != "transformer":
        raise ValueError(f"cfg layer_type {raw['layer_type']!r} (conformer) is not supported; S3PRL's WavLM "
                         "builds Transformer layers only")
    if raw.get("pos_conv_depth", 1) != 1:
        raise ValueError(f"cfg pos_conv_depth {raw['pos_conv_depth']} is not supported (one positional conv only)")
    if raw.get("conv_type", "default") != "default":
        raise ValueError(f"cfg conv_type {raw['conv_type']!r} is not supported (the 1-D conv front end only)")
    if cfg["activation_fn"] != "gelu":
        raise ValueError(f"cfg activation_fn {cfg['activation_fn']!r} is not supported (gelu only; glu "
                         "changes the FFN's shape)")
    if cfg["extractor_mode"] not in ("default", "layer_norm"):
        raise ValueError(f"cfg extractor_mode {cfg['extractor_mode']!r} is unknown; WavLM has default and layer_norm")
    if cfg["relative_position_embedding"]:
        buckets, distance = int(cfg["num_buckets"]), int(cfg["max_distance"])
        if buckets < 4 or distance <= buckets // 4:
            raise ValueError(f"cfg num_buckets {buckets} / max_distance {distance}: the bucketing needs at least "
                             "4 buckets and max_distance above num_buckets // 4")


def renames(config: ModelConfig, gated: bool) -> dict[str, str]:
    """S3PRL key -> our key (gate_scale's reshape is done by read/write)."""
    names = fairseq_renames(config.num_layers, len(config.conv_layers), config.extractor_mode)
    names["layer_norm.weight"], names["layer_norm.bias"] = "feature_norm.weight", "feature_norm.bias"
    if config.relative_position_buckets:
        names[BIAS_KEY] = "relative_position_bias.weight"
    if gated:
        for i in range(config.num_layers):
            for p in ("weight", "bias"):
                names[f"encoder.layers.{i}.self_attn.grep_linear.{p}"] = f"layers.{i}.attention.gate.{p}"
            names[f"encoder.layers.{i}.self_attn.grep_a"] = f"layers.{i}.attention.gate_scale"
    return names


def read(ckpt: dict[str, Any]) -> Converted:
    raw = dict(ckpt["cfg"])
    base = defaults()
    cfg = {**base, **{k: v for k, v in raw.items() if k in base}}
    _check_supported(raw, cfg)
    head_dim, layers = uniform_layers(
        int(cfg["encoder_layers"]), int(cfg["encoder_embed_dim"]), int(cfg["encoder_attention_heads"]),
        int(cfg["encoder_ffn_embed_dim"]),
    )
    biased = bool(cfg["relative_position_embedding"])
    config = ModelConfig(
        kind=HUBERT,  # the expert hooks every layer's input and the encoder's output, as HuBERT's does
        embed_dim=int(cfg["encoder_embed_dim"]),
        head_dim=head_dim,
        layers=layers,
        conv_layers=parse_conv_layers(cfg["conv_feature_layers"]),
        extractor_mode=cfg["extractor_mode"],
        conv_bias=bool(cfg["conv_bias"]),
        conv_pos=int(cfg["conv_pos"]),
        conv_pos_groups=int(cfg["conv_pos_groups"]),
        layer_norm_first=bool(cfg["layer_norm_first"]),
        feature_layer_norm=True,
        normalize_waveform=bool(cfg["normalize"]),
        activation=cfg["activation_fn"],
        dropout=float(cfg["dropout"]),
        attention_dropout=float(cfg["attention_dropout"]),
        activation_dropout=float(cfg["activation_dropout"]),
        relative_position_buckets=int(cfg["num_buckets"]) if biased else 0,
        max_relative_distance=int(cfg["max_distance"]) if biased else 800,
        # Without the bias WavLM builds the gate's parameters but never uses them: they go to extras.
        gated_relative_position=biased and bool(cfg["gru_rel_pos"]),
    )
    state, rest = rename(ckpt["model"], renames(config, config.gated_relative_position))
    for key, tensor in list(state.items()):
        if key.endswith(".gate_scale"):
            state[key] = tensor.reshape(-1)  # WavLM's (1, H, 1, 1) broadcast shape, one value per head
    extras = {"cfg": raw, "pretraining_weights": rest}  # mask_emb (and an unused gate's tensors)
    return Converted(config, state, NAME, extras)


def _check_writable(config: ModelConfig) -> None:
    """Refuse, saying why, structures S3PRL's WavLM class cannot build."""
    if config.kind != HUBERT or config.frontend != "conv" or not config.feature_layer_norm or config.pred_layer_id \
            or config.feature_scale:
        raise ValueError("S3PRL's WavLM needs a conv front end with its feature LayerNorm, HuBERT's hidden-state "
                         "layout and no prediction heads or feature scale")
    layer = require_uniform(config)  # removed sublayers, per-layer shapes, low-rank factors
    if layer.num_heads * config.head_dim != config.embed_dim:
        raise ValueError(
            f"heads were pruned ({layer.num_heads} heads of {config.head_dim} in a {config.embed_dim}-wide model): "
            "S3PRL's WavLM sizes a head as encoder_embed_dim / encoder_attention_heads, so it cannot hold them; "
            "load the delta through compressed_local instead"
        )
    if layer.head_ids is not None and layer.head_ids != list(range(layer.num_heads)):
        raise ValueError(f"heads were reordered (head_ids {layer.head_ids}): S3PRL's WavLM ties head h to bias "
                         "column h and input chunk h; load the delta through compressed_local instead")


def write(converted: Converted) -> dict[str, Any]:
    """The inverse of :func:`read`: ``{"cfg", "model"}`` that ``torch.save`` writes and ``wavlm_local`` loads.

    Weight-pruning masks are left out (the weights are zero there); structures S3PRL's class cannot
    build are refused with the reason.
    """
    config, extras = converted.config, converted.extras
    _check_writable(config)
    layer = config.layers[0]
    back = invert(renames(config, config.gated_relative_position))
    weights: dict[str, Tensor] = {}
    for key, tensor in dense_state(converted).items():
        if key not in back:
            raise ValueError(f"tensor {key} has no place in S3PRL's WavLM layout")
        weights[back[key]] = tensor.reshape(1, -1, 1, 1) if key.endswith(".gate_scale") else tensor
    # Set-aside tensors of layers the model no longer has (a distilled student) would not load.
    weights.update({key: tensor for key, tensor in extras.get("pretraining_weights", {}).items()
                    if not (match := LAYER_KEY.match(key)) or int(match.group(1)) < config.num_layers})
    raw = dict(extras.get("cfg", {}))
    conv_spec = raw.get("conv_feature_layers")
    if conv_spec is None or parse_conv_layers(conv_spec) != list(config.conv_layers):
        raw["conv_feature_layers"] = repr([tuple(c) for c in config.conv_layers])
    biased = config.relative_position_buckets > 0
    raw.update(
        extractor_mode=config.extractor_mode,
        encoder_layers=config.num_layers,
        encoder_embed_dim=config.embed_dim,
        encoder_ffn_embed_dim=layer.ffn_dim,
        encoder_attention_heads=layer.num_heads,
        layer_norm_first=config.layer_norm_first,
        conv_bias=config.conv_bias,
        conv_pos=config.conv_pos,
        conv_pos_groups=config.conv_pos_groups,
        normalize=config.normalize_waveform,
        relative_position_embedding=biased,
    )
    if biased:
        raw.update(num_buckets=config.relative_position_buckets, max_distance=config.max_relative_distance,
                   gru_rel_pos=config.gated_relative_position)
    return {"cfg": raw, "model": weights}
