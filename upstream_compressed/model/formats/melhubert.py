"""MelHuBERT checkpoints <-> (ModelConfig, state_dict) of :class:`SpeechTransformer`.

The layout MelHuBERT's own code writes and its S3PRL upstream reads:
``{"model": state_dict, "Upstream_Config": {"melhubert": {...architecture...}}, ...}``, with optional
``Pruned_heads`` (head-pruned: a list of ``{layer: [head indices]}``, one per pruning step) and
``Pruning`` (weight-pruned: the state dict holds ``<name>_orig`` and ``<name>_mask`` pairs). The
fbank normalisation statistics live in a separate ``.npy`` file of shape (2, 40): mean, then std.
Per-layer heads and FFN widths are read from the tensors, so pruned checkpoints load too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import FBANK, MELHUBERT, LayerConfig, ModelConfig
from .common import Converted, dense_state, encoder_options, encoder_renames, require_uniform

NAME = "melhubert"
MEL_BINS = 40  # MelHuBERT's fbank has 40 mel bins; 80-dim inputs are two stacked frames
# Where the statistics file is looked for beside a checkpoint ``<stem>.ckpt``, in this order.
MEAN_STD_CANDIDATES = ("{stem}.mean-std.npy", "{stem}-mean-std.npy", "mean-std.npy")
MEAN_STD_KEYS = ("feature_extractor.mean", "feature_extractor.std")


def matches(ckpt: dict[str, Any]) -> bool:
    return "model" in ckpt and isinstance(ckpt.get("Upstream_Config"), dict)


def find_mean_std(ckpt_path: str | os.PathLike) -> Path | None:
    """The statistics file beside a checkpoint, by the conventional names, or None."""
    ckpt_path = Path(ckpt_path)
    for pattern in MEAN_STD_CANDIDATES:
        candidate = ckpt_path.parent / pattern.format(stem=ckpt_path.stem)
        if candidate.is_file():
            return candidate
    return None


def load_mean_std(path: str | os.PathLike, bins: int = MEL_BINS) -> tuple[Tensor, Tensor]:
    """(mean, std) of ``bins`` dimensions from a MelHuBERT mean/std ``.npy`` (rows: mean, std)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"fbank mean/std file {path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"fbank mean/std file {path} is not a numpy .npy array: {error}") from error
    if data.shape[0] != 2 or data[0].size != bins:
        raise ValueError(f"fbank mean/std file {path} has shape {data.shape}; expected 2 rows (mean, std) of {bins}")
    mean = torch.from_numpy(np.ascontiguousarray(data[0], dtype=np.float32).reshape(-1))
    std = torch.from_numpy(np.ascontiguousarray(data[1], dtype=np.float32).reshape(-1))
    if not bool((std > 0).all()) or not bool(torch.isfinite(mean).all()):
        raise ValueError(f"fbank mean/std file {path}: std must be positive and mean finite")
    return mean, std


def _fold_pruning_masks(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``X_orig`` * ``X_mask`` -> ``X``: what MelHuBERT's upstream does when it removes the pruning hooks."""
    folded = {}
    for key, tensor in state.items():
        if key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state:
            continue
        if key.endswith("_orig"):
            name = key[: -len("_orig")]
            mask = state.get(name + "_mask")
            if mask is None:
                raise ValueError(f"weight-pruned tensor {key} has no {name}_mask beside it")
            folded[name] = tensor * mask.to(tensor.dtype)
        else:
            folded[key] = tensor
    return folded


def _renames(layer_count: int) -> dict[str, str]:
    """MelHuBERT key -> our key: HuBERT's encoder names, with the fbank projection as the feature projection."""

    names = {f"pre_extract_proj.{p}": f"feature_projection.{p}" for p in ("weight", "bias")}
    return {**names, **encoder_renames(layer_count)}


def _pruned_head_counts(pruned: Any) -> dict[int, int]:
    """``Pruned_heads`` (one ``{layer: [heads]}`` per pruning step) -> heads removed per layer."""
    steps = pruned if isinstance(pruned, list) else [pruned]
    counts: dict[int, int] = {}
    for step in steps:
        for layer, heads in dict(step).items():
            counts[int(layer)] = counts.get(int(layer), 0) + len(heads)
    return counts


def read(ckpt: dict[str, Any], mean_std: str | os.PathLike) -> Converted:
    """A MelHuBERT checkpoint and its statistics file in our terms."""
    upstream_config = ckpt["Upstream_Config"]
    if "melhubert" not in upstream_config:
        raise ValueError(f"Upstream_Config has sections {sorted(upstream_config)}, but no `melhubert` section")
    cfg = dict(upstream_config["melhubert"])
    get = cfg.get
    if str(get("pos_emb_type", "conv")) != "conv" or int(get("pos_conv_depth", 1)) != 1:
        raise ValueError("only a single convolutional positional embedding (pos_emb_type conv, depth 1) is supported")
    if str(get("attention_type", "original")) != "original":
        raise ValueError(f"attention_type {get('attention_type')!r} is not supported")
    feat_dim = int(get("feat_emb_dim", MEL_BINS))
    if feat_dim not in (MEL_BINS, 2 * MEL_BINS):
        raise ValueError(f"feat_emb_dim {feat_dim} is neither {MEL_BINS} (10 ms frames) nor {2 * MEL_BINS} (20 ms)")
    dim, heads = int(get("encoder_embed_dim", 768)), int(get("encoder_attention_heads", 12))
    if dim % heads:
        raise ValueError(f"encoder_embed_dim {dim} is not divisible by {heads} heads")
    head_dim, count = dim // heads, int(get("encoder_layers", 1))

    state = _fold_pruning_masks(dict(ckpt["model"]))
    removed = _pruned_head_counts(ckpt.get("Pruned_heads") or [])
    layers = []
    for i in range(count):  # the tensors say how many heads / units each layer kept
        kept_heads = state[f"encoder.layers.{i}.self_attn.q_proj.weight"].shape[0] // head_dim
        if "Pruned_heads" in ckpt and kept_heads != heads - removed.get(i, 0):
            raise ValueError(f"layer {i} has {kept_heads} heads, but Pruned_heads says {heads - removed.get(i, 0)}")
        layers.append(LayerConfig(num_heads=kept_heads, ffn_dim=state[f"encoder.layers.{i}.fc1.weight"].shape[0]))
    config = ModelConfig(
        kind=MELHUBERT,
        embed_dim=dim,
        head_dim=head_dim,
        layers=layers,
        conv_layers=[],
        frontend=FBANK,
        fbank_mel_bins=MEL_BINS,
        fbank_stack=feat_dim // MEL_BINS,
        **encoder_options(get),
    )
    names = _renames(count)
    ours, rest = {}, {}
    for key, tensor in state.items():
        (ours if key in names else rest)[names.get(key, key)] = tensor
    unexpected = sorted(set(rest) - {"final_proj.weight", "final_proj.bias", "mask_emb"})
    if unexpected:
        raise ValueError(f"unexpected MelHuBERT tensors {unexpected[:5]}")
    ours[MEAN_STD_KEYS[0]], ours[MEAN_STD_KEYS[1]] = load_mean_std(mean_std)
    extras = {"upstream_config": upstream_config, "pretraining_weights": rest, "mean_std": str(mean_std)}
    return Converted(config, ours, NAME, extras)


def write(converted: Converted) -> dict[str, Any]:
    """The inverse of :func:`read` for a uniform model (the statistics stay in their own file)."""
    config, state, extras = converted.config, dense_state(converted), converted.extras
    layer = require_uniform(config)
    back = {ours: theirs for theirs, ours in _renames(config.num_layers).items()}
    weights = {back[key]: tensor for key, tensor in state.items() if key in back}
    weights.update(extras.get("pretraining_weights", {}))
    upstream_config = {k: dict(v) if isinstance(v, dict) else v for k, v in extras.get("upstream_config", {}).items()}
    section = upstream_config.setdefault("melhubert", {})
    section.update(
        feat_emb_dim=config.conv_dim,
        encoder_layers=config.num_layers,
        encoder_embed_dim=config.embed_dim,
        encoder_ffn_embed_dim=layer.ffn_dim,
        encoder_attention_heads=layer.num_heads,
        layer_norm_first=config.layer_norm_first,
        conv_pos=config.conv_pos,
        conv_pos_groups=config.conv_pos_groups,
    )
    return {"model": weights, "Upstream_Config": upstream_config}
