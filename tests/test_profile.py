"""MACs from FlopCounterMode (attention included) equal the analytic count, for base and pruned models."""

from __future__ import annotations

import torch

from upstream_compressed.model import HUBERT, LayerConfig, ModelConfig, SpeechTransformer
from upstream_compressed.model.layers import factorize
from upstream_compressed.profile import count_macs

HUBERT_BASE_CONV = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2


def analytic_macs(config: ModelConfig, samples: int) -> int:
    macs, length, channels_in = 0, samples, 1
    for channels, kernel, stride in config.conv_layers:
        length = (length - kernel) // stride + 1
        macs += length * channels * channels_in * kernel
        channels_in = channels
    frames, dim = length, config.embed_dim
    if config.conv_dim != dim:
        macs += frames * config.conv_dim * dim
    pos_frames = frames + 2 * (config.conv_pos // 2) - config.conv_pos + 1  # before the even-kernel trim
    macs += pos_frames * dim * (dim // config.conv_pos_groups) * config.conv_pos
    for layer in config.layers:
        inner = layer.num_heads * config.head_dim

        def linear(name: str, n_in: int, n_out: int) -> int:
            rank = layer.ranks.get(name)
            return frames * (rank * (n_in + n_out) if rank else n_in * n_out)

        macs += sum(linear(n, dim, inner) for n in ("q_proj", "k_proj", "v_proj")) + linear("out_proj", inner, dim)
        macs += 2 * layer.num_heads * frames * frames * config.head_dim  # QK^T and attention x V
        macs += linear("fc1", dim, layer.ffn_dim) + linear("fc2", layer.ffn_dim, dim)
    return macs


def base_config() -> ModelConfig:
    return ModelConfig(kind=HUBERT, embed_dim=768, head_dim=64, layers=[LayerConfig(12, 3072) for _ in range(12)],
                       conv_layers=HUBERT_BASE_CONV)


def test_hubert_base_macs_match_the_formula():
    with torch.device("meta"):  # shapes only: no memory, no time spent on random weights
        model = SpeechTransformer(base_config())
    model = model.to_empty(device="cpu")
    assert count_macs(model, 10.0) == analytic_macs(model.config, 160_000)


def test_pruned_and_low_rank_structure_macs_match_the_formula():
    model = SpeechTransformer(ModelConfig(
        kind=HUBERT, embed_dim=96, head_dim=16, layers=[LayerConfig(6, 384) for _ in range(3)],
        conv_layers=[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2, conv_pos=16, conv_pos_groups=4,
    ))
    model.keep_heads(0, [1, 4])
    model.keep_heads(2, [])
    model.keep_units(1, list(range(100)))
    model.replace_linear(1, "fc1", factorize(model.linear(1, "fc1"), 7))
    model.replace_linear(0, "q_proj", factorize(model.linear(0, "q_proj"), 5))  # on top of pruned heads
    assert count_macs(model, 3.3) == analytic_macs(model.config, 52_800)
