"""What every checkpoint layout converts into, and the key renames the fairseq-style layouts share."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from torch import Tensor

from ..config import ATTENTION_LINEAR_NAMES, LayerConfig, ModelConfig


@dataclass
class Converted:
    """A checkpoint in our terms, plus what is needed to write it back in its own format."""

    config: ModelConfig
    state_dict: dict[str, Tensor]
    source_format: str
    extras: dict[str, Any] = field(default_factory=dict)


def parse_conv_layers(spec: str | list) -> list[tuple[int, int, int]]:
    """fairseq's conv spec, a Python expression like ``"[(512,10,5)] + [(512,3,2)] * 4"``, read without eval()."""
    if not isinstance(spec, str):
        return [tuple(layer) for layer in spec]
    tree = ast.parse(spec, mode="eval")

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return value(node.left) + value(node.right)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            return value(node.left) * value(node.right)
        return ast.literal_eval(node)

    return [tuple(layer) for layer in value(tree.body)]


def fairseq_renames(layer_count: int, conv_count: int, extractor_mode: str) -> dict[str, str]:
    """fairseq-style key -> our key for the front end, projection and encoder (HuBERT, distiller, wav2vec 2.0)."""
    names: dict[str, str] = {}
    for i in range(conv_count):
        names[f"feature_extractor.conv_layers.{i}.0.weight"] = f"feature_extractor.convs.{i}.weight"
        names[f"feature_extractor.conv_layers.{i}.0.bias"] = f"feature_extractor.convs.{i}.bias"
        norm = f"feature_extractor.conv_layers.{i}.2.1" if extractor_mode == "layer_norm" else (
            "feature_extractor.conv_layers.0.2" if i == 0 else None
        )
        if norm:
            names[f"{norm}.weight"] = f"feature_extractor.norms.{i}.weight"
            names[f"{norm}.bias"] = f"feature_extractor.norms.{i}.bias"
    for p in ("weight", "bias"):
        names[f"post_extract_proj.{p}"] = f"feature_projection.{p}"
    return {**names, **encoder_renames(layer_count)}


def encoder_options(get: Callable[[str, Any], Any]) -> dict[str, Any]:
    """ModelConfig fields read alike from a distiller's or MelHuBERT's config (``get(key, default)``)."""
    return {
        "conv_pos": int(get("conv_pos", 128)),
        "conv_pos_groups": int(get("conv_pos_groups", 16)),
        "layer_norm_first": bool(get("layer_norm_first", False)),
        "feature_layer_norm": False,
        "activation": str(get("activation_fn", "gelu")),
        "dropout": float(get("dropout", 0.1)),
        "attention_dropout": float(get("attention_dropout", 0.1)),
        "activation_dropout": float(get("activation_dropout", 0.1)),
    }


def encoder_renames(layer_count: int) -> dict[str, str]:
    """fairseq-style Transformer encoder key (``encoder.`` prefix) -> our key; HuBERT, distiller, MelHuBERT."""
    names: dict[str, str] = {}
    for p in ("weight", "bias"):
        names[f"encoder.layer_norm.{p}"] = f"encoder_norm.{p}"
    for p in ("weight_g", "weight_v", "bias"):
        names[f"encoder.pos_conv.0.{p}"] = f"positional_conv.{p}"
    for i in range(layer_count):
        src, dst = f"encoder.layers.{i}", f"layers.{i}"
        for p in ("weight", "bias"):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                names[f"{src}.self_attn.{proj}.{p}"] = f"{dst}.attention.{proj}.{p}"
            names[f"{src}.self_attn_layer_norm.{p}"] = f"{dst}.attention_norm.{p}"
            names[f"{src}.fc1.{p}"] = f"{dst}.feed_forward.fc1.{p}"
            names[f"{src}.fc2.{p}"] = f"{dst}.feed_forward.fc2.{p}"
            names[f"{src}.final_layer_norm.{p}"] = f"{dst}.final_norm.{p}"
    return names


def rename(state: dict[str, Tensor], names: dict[str, str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(renamed tensors, the tensors ``names`` does not know)``."""
    ours, rest = {}, {}
    for key, tensor in state.items():
        if key in names:
            ours[names[key]] = tensor
        else:
            rest[key] = tensor
    return ours, rest


def invert(names: dict[str, str]) -> dict[str, str]:
    return {ours: theirs for theirs, ours in names.items()}


def uniform_layers(count: int, dim: int, heads: int, ffn: int) -> tuple[int, list[LayerConfig]]:
    """``(head_dim, layers)`` of a model whose every layer has ``heads`` heads and ``ffn`` units."""
    if dim % heads:
        raise ValueError(f"encoder_embed_dim {dim} is not divisible by {heads} heads")
    return dim // heads, [LayerConfig(num_heads=heads, ffn_dim=ffn) for _ in range(count)]


def require_uniform(config: ModelConfig) -> LayerConfig:
    """The one layer shape of a structure that S3PRL's own model classes can build, else ValueError saying why."""
    removed = [i for i, layer in enumerate(config.layers) if not (layer.attention and layer.ffn)]
    if removed:
        raise ValueError(
            f"layers {removed} have a removed attention or FFN sublayer, which S3PRL's own model classes cannot "
            "express; load the delta through compressed_local instead"
        )
    if config.has_feature_projection and config.conv_dim == config.embed_dim:
        raise ValueError(
            f"the pruned front end is as wide as the encoder ({config.embed_dim}) but keeps its feature projection; "
            "S3PRL's model classes build that projection only when the widths differ, so use compressed_local"
        )
    first = config.layers[0] if config.layers else LayerConfig(num_heads=1, ffn_dim=0)
    if any(layer != first for layer in config.layers):
        raise ValueError(
            "S3PRL's own model classes need every layer to have the same heads, FFN width and no "
            "low-rank factors; this structure differs per layer, so it is only loadable as a delta upstream"
        )
    if first.ranks:
        raise ValueError("S3PRL's model classes have no low-rank layers; use the delta upstream")
    return first


def fairseq_model_fields(config: ModelConfig, layer: LayerConfig) -> dict[str, Any]:
    """The fairseq model-config fields that describe a uniform structure (HuBERT, wav2vec 2.0 and WavLM share them)."""
    return {
        "encoder_layers": config.num_layers,
        "encoder_embed_dim": config.embed_dim,
        "encoder_ffn_embed_dim": layer.ffn_dim,
        "encoder_attention_heads": layer.num_heads,
        "layer_norm_first": config.layer_norm_first,
        "conv_feature_layers": repr(config.conv_layers),
        "extractor_mode": config.extractor_mode,
        "conv_bias": config.conv_bias,
        "conv_pos": config.conv_pos,
        "conv_pos_groups": config.conv_pos_groups,
    }


def dense_state(converted: Converted) -> dict[str, Tensor]:
    """The state dict without weight-pruning masks: S3PRL's layouts have no place for them, and the weights
    are already zero where a mask prunes them (the file then runs dense in S3PRL's own upstreams)."""
    return {key: tensor for key, tensor in converted.state_dict.items() if not key.endswith(".mask")}


def pad_heads(config: ModelConfig, state: dict[str, Tensor]) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The same network with every layer back at ``embed_dim // head_dim`` heads, the added ones all zero.

    S3PRL's attention always has ``embed_dim`` wide q/k/v/out projections (its head_dim is embed_dim over
    the head count), so fewer heads of the same head_dim do not fit it. A head whose q/k/v rows, biases and
    out_proj columns are zero adds exactly nothing, so padding is the pruned network itself; the kept heads
    come first (attention does not depend on the order of its heads).
    """
    full = config.embed_dim // config.head_dim
    if full * config.head_dim != config.embed_dim:
        raise ValueError(f"head_dim {config.head_dim} does not divide embed_dim {config.embed_dim}")
    state = dict(state)
    for i, layer in enumerate(config.layers):
        if not layer.attention or layer.num_heads == full or set(layer.ranks) & set(ATTENTION_LINEAR_NAMES):
            continue  # removed or low-rank attention: left for require_uniform to refuse
        width = layer.num_heads * config.head_dim
        for name in ("q_proj", "k_proj", "v_proj"):
            for p in ("weight", "bias"):
                key = f"layers.{i}.attention.{name}.{p}"
                kept = state[key]
                padded = kept.new_zeros((config.embed_dim, *kept.shape[1:]))
                padded[:width] = kept
                state[key] = padded
        key = f"layers.{i}.attention.out_proj.weight"
        padded = state[key].new_zeros((config.embed_dim, config.embed_dim))
        padded[:, :width] = state[key]
        state[key] = padded
    layers = [replace(layer, num_heads=full) if layer.attention else layer for layer in config.layers]
    return replace(config, layers=layers), state
