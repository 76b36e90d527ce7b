"""Tiny WavLM checkpoints in the format S3PRL's ``wavlm_local`` reads: ``{"cfg": {...}, "model": state_dict}``.

Built with S3PRL's own ``WavLM`` class, with random weights everywhere (non-zero biases, a random
relative position bias and gate), so parity tests see every parameter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .checkpoints import _randomize_norms, _save

# Odd kernels, total stride 320 like WavLM's, narrow channels.
TINY_WAVLM_CONV_LAYERS = "[(24,9,5)] + [(24,3,2)] * 3 + [(24,5,2)] + [(24,2,2)] * 2"


def wavlm_cfg(
    *,
    layers: int = 2,
    dim: int = 48,
    ffn: int = 70,
    heads: int = 3,
    layer_norm_first: bool = False,
    normalize: bool = False,
    extractor_mode: str = "default",
    conv_layers: str = TINY_WAVLM_CONV_LAYERS,
    conv_bias: bool = False,
    conv_pos: int = 15,
    conv_pos_groups: int = 4,
    relative_position_embedding: bool = True,
    num_buckets: int = 12,
    max_distance: int = 20,
    gru_rel_pos: bool = True,
    **more: Any,
) -> dict[str, Any]:
    """A WavLMConfig dictionary with tiny shapes (``more`` adds or overrides fields)."""
    return dict(
        extractor_mode=extractor_mode,
        encoder_layers=layers,
        encoder_embed_dim=dim,
        encoder_ffn_embed_dim=ffn,
        encoder_attention_heads=heads,
        activation_fn="gelu",
        layer_norm_first=layer_norm_first,
        conv_feature_layers=conv_layers,
        conv_bias=conv_bias,
        normalize=normalize,
        conv_pos=conv_pos,
        conv_pos_groups=conv_pos_groups,
        relative_position_embedding=relative_position_embedding,
        num_buckets=num_buckets,
        max_distance=max_distance,
        gru_rel_pos=gru_rel_pos,
        **more,
    )


def make_wavlm_checkpoint(path: str | os.PathLike, *, seed: int = 0, **options: Any) -> Path:
    """Write a random WavLM built by S3PRL's class (options: see :func:`wavlm_cfg`)."""
    from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

    cfg = wavlm_cfg(**options)
    torch.manual_seed(seed)
    model = WavLM(WavLMConfig(cfg))
    generator = torch.Generator().manual_seed(seed + 1)
    _randomize_norms(model, generator)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias") or "grep" in name or "relative_attention_bias" in name:
                # WavLM initialises biases to 0 and grep_a to 1: random values make each of them matter.
                scale = 1.0 if "relative_attention_bias" in name else 0.3
                offset = 1.0 if name.endswith("grep_a") else 0.0
                parameter.copy_(offset + scale * torch.randn(parameter.shape, generator=generator))
    return _save({"cfg": cfg, "model": model.state_dict()}, path)
