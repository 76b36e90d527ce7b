"""Tiny checkpoints in the exact formats that S3PRL's own loaders read.

They are built with S3PRL's own model classes (random weights), so a test that loads them with
``hubert_local`` / ``distiller_local`` exercises the real loading code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# A front end with HuBERT's total stride (320) and receptive field (400 samples), but narrow.
TINY_CONV_LAYERS = "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2"
HUBERT_BASE_CONV_LAYERS = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"
# HuBERT Base's shape (fairseq's hubert_base_ls960: 504 k-means targets, final_dim 256).
HUBERT_BASE = dict(layers=12, dim=768, ffn=3072, heads=12, conv_layers=HUBERT_BASE_CONV_LAYERS, conv_pos=128,
                   conv_pos_groups=16, final_dim=256, num_classes=504)


def _randomize_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give LayerNorm/GroupNorm affine weights non-trivial values, so parity tests see them."""
    for module in model.modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and module.weight is not None:
            with torch.no_grad():
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))


def _save(obj: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def make_hubert_checkpoint(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    layers: int = 2,
    dim: int = 64,
    ffn: int = 128,
    heads: int = 4,
    layer_norm_first: bool = False,
    normalize: bool = False,
    extractor_mode: str = "default",
    conv_layers: str = TINY_CONV_LAYERS,
    conv_pos: int = 16,
    conv_pos_groups: int = 4,
    final_dim: int | None = None,
    num_classes: int = 10,
    required_seq_len_multiple: int | None = None,
) -> Path:
    """Write a random HuBERT in S3PRL's converted format (``hubert_local`` reads it).

    ``final_dim`` (default ``dim // 2``) and ``num_classes`` size the pre-training-only tensors
    (``final_proj``, ``label_embs_concat``); ``required_seq_len_multiple`` (S3PRL's default 2 when
    omitted) pads the encoder's input to a multiple of that many frames. ``**HUBERT_BASE`` gives
    HuBERT Base's shape.
    """
    from s3prl.upstream.hubert.hubert_model import (
        HubertConfig,
        HubertModel,
        HubertPretrainingConfig,
    )

    torch.manual_seed(seed)
    model_cfg = dict(
        label_rate=50,
        extractor_mode=extractor_mode,
        encoder_layers=layers,
        encoder_embed_dim=dim,
        encoder_ffn_embed_dim=ffn,
        encoder_attention_heads=heads,
        layer_norm_first=layer_norm_first,
        conv_feature_layers=conv_layers,
        conv_pos=conv_pos,
        conv_pos_groups=conv_pos_groups,
        final_dim=dim // 2 if final_dim is None else final_dim,
    )
    if required_seq_len_multiple is not None:
        model_cfg["required_seq_len_multiple"] = required_seq_len_multiple
    task_cfg = dict(label_rate=50, sample_rate=16000, normalize=normalize)
    dictionaries_symbols = [[str(i) for i in range(num_classes)]]
    model = HubertModel(
        HubertConfig(**model_cfg), HubertPretrainingConfig(**task_cfg), [list(range(num_classes))]
    )
    _randomize_norms(model, torch.Generator().manual_seed(seed + 1))
    return _save(
        {
            "task_cfg": task_cfg,
            "model_cfg": model_cfg,
            "model_weight": model.state_dict(),
            "dictionaries_symbols": dictionaries_symbols,
        },
        path,
    )


def make_distiller_checkpoint(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    layers: int = 2,
    dim: int = 64,
    ffn: int = 128,
    heads: int = 4,
    pred_layer_id: tuple[int, ...] = (2, 4, 6),
    layer_norm_first: bool = False,
    conv_layers: str = TINY_CONV_LAYERS,
    conv_pos: int = 16,
    conv_pos_groups: int = 4,
) -> Path:
    """Write a random DistilHuBERT-style student in S3PRL's distiller format (``distiller_local`` reads it)."""
    from s3prl.upstream.distiller.model import DistillerConfig, DistillerModel

    torch.manual_seed(seed)
    config = {
        "extractor_mode": "default",
        "extractor_conv_feature_layers": conv_layers,
        "extractor_dropout": 0.0,
        "feature_grad_mult": 0.1,
        "conv_pos": conv_pos,
        "conv_pos_groups": conv_pos_groups,
        "encoder_layers": layers,
        "encoder_embed_dim": dim,
        "encoder_ffn_embed_dim": ffn,
        "encoder_attention_heads": heads,
        "activation_fn": "gelu",
        "layer_norm_first": layer_norm_first,
        "attention_type": "original",
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.1,
        "encoder_layerdrop": 0.0,
        "final_dim": dim,
        "out_layer_type": "expand-last",
        "n_tasks": len(pred_layer_id),
        "task_emb_type": "expand-last",
        "pred_layer_id": list(pred_layer_id),
        "loss_type": "l1",
        "cosine_loss": 1.0,
    }
    model = DistillerModel(DistillerConfig(config))
    _randomize_norms(model, torch.Generator().manual_seed(seed + 1))
    return _save({"Config": {"distiller": config}, "Distiller": model.state_dict()}, path)
