"""MACs from FlopCounterMode (attention included) equal the analytic count, for base and pruned models."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from upstream_compressed.model import HUBERT, LayerConfig, ModelConfig, SpeechTransformer
from upstream_compressed.model.layers import factorize
from upstream_compressed.profile import count_effective_macs, count_macs

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


# ------------------------------------------------------------------ `upstream-compressed profile`
PROFILE_KEYS = {"upstream", "params", "params_encoder", "macs", "macs_effective", "seconds_audio", "median_seconds",
                "rtf", "peak_memory_bytes", "device"}


def profile_json(capsys, *args: str) -> dict:
    from upstream_compressed.cli import main

    assert main(["profile", *args, "--json", "--repeats", "2"]) == 0
    return json.loads(capsys.readouterr().out)


def test_profile_of_a_compressed_upstream_counts_our_model(tmp_path, hubert_ckpt, capsys):
    from upstream_compressed.cli import main
    from upstream_compressed.delta import load_compressed

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(hubert_ckpt), "steps": [
        {"method": "head_pruning", "ratio": 0.5},
        {"method": "low_rank", "ratio": 0.5, "targets": ["ffn"]},
        {"method": "weight_pruning", "sparsity": 0.5, "targets": ["attention"]},
    ]}))
    delta = tmp_path / "d.safetensors"
    assert main(["compress", str(recipe), "-o", str(delta)]) == 0
    capsys.readouterr()
    result = profile_json(capsys, "-u", "compressed_local", "-k", str(delta), "--seconds", "1.3")
    model, _ = load_compressed(delta, hubert_ckpt)
    assert PROFILE_KEYS <= set(result) and result["upstream"] == "compressed_local" and result["device"] == "cpu"
    assert result["macs"] == analytic_macs(model.config, 20_800)
    assert result["macs_effective"] == count_effective_macs(model, 1.3) < result["macs"]
    assert result["params"] == model.num_parameters()
    assert result["params_encoder"] == model.num_parameters(encoder_only=True)
    assert result["rtf"] == pytest.approx(result["median_seconds"] / 1.3) and result["median_seconds"] > 0
    assert result["peak_memory_bytes"] >= result["peak_memory_forward_bytes"] >= 0 and result["peak_memory_bytes"] > 0


def test_profile_of_an_s3prl_upstream_counts_the_module(tmp_path, hubert_ckpt, capsys):
    """S3PRL's own hubert_local, counted generically, gives our model's count on the same checkpoint."""
    from upstream_compressed.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(hubert_ckpt), "steps": []}))
    delta = tmp_path / "identity.safetensors"
    assert main(["compress", str(recipe), "-o", str(delta)]) == 0
    capsys.readouterr()
    # 64 frames: an even count, so S3PRL 0.4.18 does not pad the encoder's input (see README, SUPERB)
    theirs = profile_json(capsys, "-u", "hubert_local", "-k", str(hubert_ckpt), "--seconds", "1.3")
    ours = profile_json(capsys, "-u", "hubert_identity", "-k", str(delta), "--seconds", "1.3")
    assert theirs["macs"] == ours["macs"] == ours["macs_effective"]
    assert theirs["macs_effective"] is None  # unknown for a module that is not ours
    assert theirs["params_encoder"] == ours["params_encoder"]
    assert theirs["params"] > ours["params"]  # S3PRL keeps pre-training-only tensors (final_proj, ...)


def test_profile_refuses_unknown_upstreams_and_devices(capsys):
    from upstream_compressed.cli import main

    assert main(["profile", "-u", "hubert_headprune"]) == 2
    assert "did you mean hubert_headpruned" in capsys.readouterr().err
    assert main(["profile", "-u", "hubert_local", "-k", "/no/such.pt"]) == 2
    assert "/no/such.pt does not exist" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["profile", "-u", "fbank", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_peak_forward_memory_is_measured_after_warm_forwards(hubert_ckpt):
    """A warm forward used to read 0 bytes (glibc reused the pages freed by the timed forwards).

    Lower bound known without measuring: the first conv's output (32 channels x 31,999 frames of
    float32 on 10 s) and its GroupNorm's output are alive together, so the forward needs at least
    twice that; the timing runs (repeats + warmup) come before the measurement, as in the CLI.
    """
    from upstream_compressed.upstream_profile import load_upstream, profile_upstream

    upstream = load_upstream("hubert_local", str(hubert_ckpt))
    first_conv_output = 32 * ((160_000 - 10) // 5 + 1) * 4
    for _ in range(2):  # the second profile runs entirely on a warm allocator
        result = profile_upstream(upstream, "hubert_local", seconds=10.0, repeats=2)
        if result["peak_memory_measure"].startswith("process peak RSS (malloc_trim"):
            assert result["peak_memory_forward_bytes"] >= 2 * first_conv_output
        assert result["peak_memory_bytes"] >= result["peak_memory_forward_bytes"] > 0
