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


def make_melhubert_checkpoint(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    layers: int = 2,
    dim: int = 64,
    ffn: int = 128,
    heads: int = 4,
    frame_period: int = 20,
    layer_norm_first: bool = False,
    conv_pos: int = 16,
    conv_pos_groups: int = 4,
    num_cluster: int = 16,
    pruned_heads: dict[int, list[int]] | None = None,
    weight_pruned: float | None = None,
) -> Path:
    """Write a random MelHuBERT in the layout of its public code, and its mean/std file beside it.

    The checkpoint is ``{"model", "Upstream_Config": {"melhubert": ...}, "Step", "Args", "Runner"}``
    with MelHuBERT's key names; the statistics go to ``<stem>.mean-std.npy`` (rows: mean, std of
    the 40 log-mel dimensions). ``pruned_heads`` ({layer: [heads]}) writes a head-pruned checkpoint
    (smaller q/k/v/out and a ``Pruned_heads`` entry); ``weight_pruned`` (a fraction) a weight-pruned
    one (``<name>_orig`` / ``<name>_mask`` pairs for the encoder Linears and a ``Pruning`` entry).
    Returns the checkpoint's path.
    """
    import argparse

    import numpy as np
    from torch import nn

    if frame_period not in (10, 20):
        raise ValueError(f"frame_period must be 10 or 20 (ms), not {frame_period}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    feat_dim = 40 * frame_period // 10
    head_dim = dim // heads
    pruned_heads = pruned_heads or {}
    config = {
        "feat_emb_dim": feat_dim, "pos_emb_type": "conv", "pos_conv_depth": 1, "conv_pos": conv_pos,
        "conv_pos_groups": conv_pos_groups, "encoder_layers": layers, "encoder_embed_dim": dim,
        "encoder_ffn_embed_dim": ffn, "encoder_attention_heads": heads, "activation_fn": "gelu",
        "layer_norm_first": layer_norm_first, "attention_type": "original", "num_cluster": num_cluster,
        "pred_masked_weight": 1.0, "pred_nomask_weight": 0.0, "skip_masked": False, "skip_nomask": True,
        "mask_prob": 0.7, "mask_length": 5, "mask_selection": "static", "mask_other": 0.0,
        "no_mask_overlap": False, "mask_min_space": 1, "learnable_mask_emb": False, "mask_before_proj": True,
        "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1, "encoder_layerdrop": 0.0,
    }

    def linear(prefix: str, n_in: int, n_out: int) -> dict[str, torch.Tensor]:
        module = nn.Linear(n_in, n_out)
        nn.init.normal_(module.bias, std=0.02)
        return {f"{prefix}.weight": module.weight.detach(), f"{prefix}.bias": module.bias.detach()}

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + 0.2 * torch.randn(dim, generator=generator),
                f"{prefix}.bias": 0.2 * torch.randn(dim, generator=generator)}

    state: dict[str, torch.Tensor] = {}
    if feat_dim != dim:
        state.update(linear("pre_extract_proj", feat_dim, dim))
    # A weight-normalised conv (over the kernel axis) as torch.nn.utils.weight_norm(dim=2) stores it.
    weight_v = torch.randn(dim, dim // conv_pos_groups, conv_pos, generator=generator) * (4 / (conv_pos * dim)) ** 0.5
    weight_g = weight_v.norm(dim=(0, 1), keepdim=True)
    state["encoder.pos_conv.0.weight_g"] = weight_g * (1 + 0.2 * torch.rand(1, 1, conv_pos, generator=generator))
    state["encoder.pos_conv.0.weight_v"] = weight_v
    state["encoder.pos_conv.0.bias"] = 0.02 * torch.randn(dim, generator=generator)
    for i in range(layers):
        prefix = f"encoder.layers.{i}"
        inner = (heads - len(pruned_heads.get(i, []))) * head_dim
        for proj in ("k_proj", "v_proj", "q_proj"):
            state.update(linear(f"{prefix}.self_attn.{proj}", dim, inner))
        state.update(linear(f"{prefix}.self_attn.out_proj", inner, dim))
        state.update(norm(f"{prefix}.self_attn_layer_norm"))
        state.update(linear(f"{prefix}.fc1", dim, ffn))
        state.update(linear(f"{prefix}.fc2", ffn, dim))
        state.update(norm(f"{prefix}.final_layer_norm"))
    state.update(norm("encoder.layer_norm"))
    state.update(linear("final_proj", dim, num_cluster))

    ckpt = {
        "model": state,
        "Upstream_Config": {"melhubert": config},
        "Step": 1,
        "Args": argparse.Namespace(frame_period=frame_period, mode="melhubert"),
        "Runner": {"runner": {"total_steps": 1}},
    }
    if pruned_heads:
        ckpt["Pruned_heads"] = [{layer: list(h)} for layer, h in pruned_heads.items()]
    if weight_pruned is not None:  # torch.nn.utils.prune's layout: X_orig, X_mask for weights and biases
        for key in [k for k in state if k.startswith("encoder.layers.") and "norm" not in k]:
            tensor = state.pop(key)
            mask = (torch.rand(tensor.shape, generator=generator) >= weight_pruned).float()
            state[f"{key}_orig"], state[f"{key}_mask"] = tensor, mask
        ckpt["Pruning"] = {"pruning_times": 1}
    path = _save(ckpt, path)
    # Statistics like log-mel energies of 16-bit speech: means around 10, standard deviations 2 to 4.
    stats = np.stack([10 + 2 * torch.randn(40, generator=generator).numpy(),
                      2 + 2 * torch.rand(40, generator=generator).numpy()]).astype(np.float32)
    stats_path = path.parent / f"{path.stem}.mean-std.npy"
    with open(stats_path.with_suffix(".tmp"), "wb") as handle:
        np.save(handle, stats)
    os.replace(stats_path.with_suffix(".tmp"), stats_path)
    return path
