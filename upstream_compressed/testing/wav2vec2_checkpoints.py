"""Tiny wav2vec 2.0 checkpoints in S3PRL's converted layout, built with S3PRL's own model class.

S3PRL's ``wav2vec2/convert.py`` writes ``{"task_cfg", "model_cfg", "model_weight"}``: fairseq's task and
model configs as plain dicts (``OmegaConf.to_container``, so every field of the config with its
``_name``, tuples as lists) and the full pre-training state dict, quantizer included. The files made
here have exactly that shape, so ``wav2vec2_local`` loads them with its real loading code.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

# Total stride 320 (S3PRL's wav2vec2 expert reports 320 whatever the front end), odd kernels and
# unequal, narrow channels, so a wrong kernel, stride or channel count shows up as a shape error.
TINY_CONV_LAYERS = "[(16, 11, 5), (24, 3, 2), (20, 5, 2), (20, 3, 2), (18, 3, 2), (20, 2, 2), (22, 2, 2)]"


def _plain(value: Any) -> Any:
    """What OmegaConf.to_container leaves of a config value: enums as strings, tuples as lists."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return value.value
    return value


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial norm affines and non-zero biases everywhere (fairseq zeroes some at init), so a dropped or
    misnamed bias or norm changes the hidden states."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and module.weight is not None:
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))


def make_wav2vec2_checkpoint(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    layers: int = 2,
    dim: int = 48,
    ffn: int = 40,
    heads: int = 3,
    layer_norm_first: bool = False,
    normalize: bool = False,
    extractor_mode: str = "default",
    conv_bias: bool = False,
    conv_layers: str = TINY_CONV_LAYERS,
    conv_pos: int = 15,
    conv_pos_groups: int = 3,
    final_dim: int = 12,
    latent_vars: int = 7,
    latent_groups: int = 2,
) -> Path:
    """Write a random wav2vec 2.0 in S3PRL's converted format (``wav2vec2_local`` reads it).

    Defaults are Base-style (post-LN, GroupNorm front end); ``layer_norm_first=True, normalize=True,
    extractor_mode="layer_norm", conv_bias=True`` is Large-style (wav2vec2 Large LV-60). The quantizer
    (``quantize_targets``, as in every released pre-trained file) has ``latent_groups`` groups of
    ``latent_vars`` codes of ``final_dim // latent_groups`` dims each.
    """
    from s3prl.upstream.wav2vec2.wav2vec2_model import AudioPretrainingConfig, Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(seed)
    model_cfg = Wav2Vec2Config(
        extractor_mode=extractor_mode,
        encoder_layers=layers,
        encoder_embed_dim=dim,
        encoder_ffn_embed_dim=ffn,
        encoder_attention_heads=heads,
        layer_norm_first=layer_norm_first,
        conv_feature_layers=conv_layers,
        conv_bias=conv_bias,
        conv_pos=conv_pos,
        conv_pos_groups=conv_pos_groups,
        final_dim=final_dim,
        quantize_targets=True,
        latent_vars=latent_vars,
        latent_groups=latent_groups,
        # wav2vec_small's training settings: inert in eval mode, present in the real file.
        encoder_layerdrop=0.05,
        dropout_input=0.1,
        dropout_features=0.1,
        feature_grad_mult=0.1,
    )
    task_cfg = AudioPretrainingConfig(normalize=normalize, max_sample_size=250000, min_sample_size=32000)
    model = Wav2Vec2Model(model_cfg)
    _randomize(model, torch.Generator().manual_seed(seed + 1))
    # fairseq's hydra configs carry their registry name and task-only fields that S3PRL drops on loading.
    model_dict = {"_name": "wav2vec2", **{k: _plain(v) for k, v in dataclasses.asdict(model_cfg).items()}}
    task_dict = {"_name": "audio_pretraining", "data": "/path/to/manifests", "labels": None,
                 **{k: _plain(v) for k, v in dataclasses.asdict(task_cfg).items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"task_cfg": task_dict, "model_cfg": model_dict, "model_weight": model.state_dict()}, path)
    return path


def wav2vec2_reference(path: str | os.PathLike) -> torch.nn.Module:
    """S3PRL's own ``wav2vec2_local`` upstream on ``path``, in eval mode (the reference parity tests use)."""
    from .. import s3prl_compat

    s3prl_compat.apply()
    from s3prl.upstream.wav2vec2.hubconf import wav2vec2_local

    return wav2vec2_local(ckpt=str(path)).eval()
