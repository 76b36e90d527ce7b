"""Analytic parameters and MACs equal what the model has and what count_macs counts; soft counts differentiate."""

from __future__ import annotations

import random

import pytest
import torch

from upstream_compressed.model import LayerConfig, ModelConfig, SpeechTransformer
from upstream_compressed.model.config import DISTILLER, FBANK, HUBERT, LINEAR_NAMES, MELHUBERT, TORCHAUDIO
from upstream_compressed.model.convert import load_base
from upstream_compressed.model.costs import Counts, counts_of, frame_count, mac_count, parameter_count
from upstream_compressed.model.layers import factorize
from upstream_compressed.profile import count_macs
from upstream_compressed.testing.checkpoints import make_melhubert_checkpoint


def random_layer(rng: random.Random, embed_dim: int, head_dim: int) -> LayerConfig:
    attention, ffn = rng.random() > 0.25, rng.random() > 0.25
    heads = rng.randint(0, 3) if attention else 0
    units = rng.choice([0, 5, 17, 32]) if ffn else 0
    names = [n for n in LINEAR_NAMES if (attention if n in LINEAR_NAMES[:4] else ffn)]
    rng.shuffle(names)
    ranks = {n: rng.randint(1, 6) for n in names[:rng.randint(0, 2)]}
    sparse = names[len(ranks):len(ranks) + rng.randint(0, 2)]
    return LayerConfig(heads, units, ranks=ranks, sparse=sparse, attention=attention, ffn=ffn)


def random_config(seed: int) -> ModelConfig:
    """A structure any compression here could make: pruned channels, heads, units, sublayers, ranks, masks."""
    rng = random.Random(seed)
    embed_dim, head_dim = rng.choice([16, 24]), rng.choice([4, 8])
    fbank = seed % 5 == 4
    kind = MELHUBERT if fbank else rng.choice([HUBERT, DISTILLER, TORCHAUDIO])
    conv_layers = [] if fbank else [(rng.randint(1, 12), 10, 5)] + [
        (rng.randint(1, 12), rng.choice([2, 3]), 2) for _ in range(rng.randint(1, 5))
    ]
    if not fbank and rng.random() < 0.3:  # as wide as the encoder, with or without the projection
        conv_layers[-1] = (embed_dim, *conv_layers[-1][1:])
    heads = rng.random() < 0.4
    return ModelConfig(
        kind=kind, embed_dim=embed_dim, head_dim=head_dim,
        layers=[random_layer(rng, embed_dim, head_dim) for _ in range(rng.randint(1, 3))],
        conv_layers=conv_layers,
        extractor_mode=rng.choice(["default", "layer_norm"]),
        conv_bias=rng.random() < 0.5,
        conv_pos=rng.choice([3, 4, 8]), conv_pos_groups=rng.choice([1, 2, 4]),
        layer_norm_first=rng.random() < 0.5,
        feature_layer_norm=rng.random() < 0.6,
        pred_layer_id=[1, 2] if heads else [],
        pred_inter_dim=6 if heads else 0, pred_out_dim=5 if heads else 0,
        frontend=FBANK if fbank else "conv",
        fbank_mel_bins=rng.choice([8, 40]), fbank_stack=rng.choice([1, 2]),
        feature_projection=True if not fbank and rng.random() < 0.3 else None,
        feature_scale=kind == TORCHAUDIO and rng.random() < 0.5,  # a buffer: no parameters, no MACs
    )


def random_wavlm_config(seed: int) -> ModelConfig:
    """``random_config(seed)`` with WavLM's relative position bias (gated or not) and pruned heads that keep
    arbitrary original head ids."""
    rng = random.Random(1000 + seed)
    data = random_config(seed).to_dict()
    data.update(relative_position_buckets=rng.choice([4, 6, 10]), max_relative_distance=rng.choice([8, 20]),
                gated_relative_position=rng.random() < 0.7)
    original_heads = data["embed_dim"] // data["head_dim"]
    for layer in data["layers"]:
        layer["num_heads"] = min(layer["num_heads"], original_heads)
        if rng.random() < 0.7:
            layer["head_ids"] = rng.sample(range(original_heads), layer["num_heads"])
    return ModelConfig.from_dict(data)


CONFIGS = [pytest.param(random_config, seed, id=f"random-{seed}") for seed in range(30)] + [
    pytest.param(random_wavlm_config, seed, id=f"wavlm-{seed}") for seed in range(12)
]


@pytest.mark.parametrize("make_config,seed", CONFIGS)
def test_analytic_counts_equal_the_models(make_config, seed):
    config = make_config(seed)
    torch.manual_seed(seed)
    model = SpeechTransformer(config).eval()
    assert parameter_count(config) == model.num_parameters()
    for seconds in (0.3, 1.07):
        assert mac_count(config, seconds) == count_macs(model, seconds)
    states, _ = model(torch.zeros(1, int(0.3 * 16000)))
    assert states[0].shape[1] == frame_count(config, 0.3)


def test_analytic_counts_follow_structural_operations(hubert_ckpt, distiller_ckpt):
    for ckpt in (hubert_ckpt, distiller_ckpt):
        base = load_base(ckpt)
        model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
        model.keep_channels(0, [3, 1, 4])
        model.keep_channels(6, list(range(11)))
        model.keep_heads(0, [2])
        model.remove_ffn(0)
        model.remove_attention(1)
        model.keep_units(1, [0, 9, 4])
        model.replace_linear(1, "fc1", factorize(model.linear(1, "fc1"), 2))
        assert parameter_count(model.config) == model.num_parameters()
        assert mac_count(model.config, 1.0) == count_macs(model, 1.0)


def test_melhubert_counts_include_its_filterbank(tmp_path):
    base = load_base(make_melhubert_checkpoint(tmp_path / "mel.pt"))
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
    assert parameter_count(base.config) == model.num_parameters()
    assert mac_count(base.config, 0.8) == count_macs(model, 0.8)


def as_tensors(counts: Counts) -> Counts:
    return Counts(*([torch.tensor(float(v), requires_grad=True) for v in values] for values in
                    (counts.channels, counts.heads, counts.units, counts.attention, counts.ffn)))


@pytest.mark.parametrize("make_config,seed", [(random_config, s) for s in (0, 1, 3, 7)]
                         + [(random_wavlm_config, s) for s in (0, 2)])
def test_soft_counts_at_the_integers_equal_the_exact_ones_and_their_gradients_are_differences(make_config, seed):
    """Each size is linear in every single count (C_{i-1} x C_i, heads x T^2, gate x sublayer), so the
    gradient with respect to one count equals the change when that count grows by one."""
    config = make_config(seed)
    for layer in config.layers:  # a low-rank Linear in a block of 0 heads/units: the one documented jump
        layer.ranks = {}
    exact = counts_of(config)
    soft = as_tensors(exact)
    for cost in (lambda counts: parameter_count(config, counts), lambda counts: mac_count(config, 0.5, counts)):
        value = cost(soft)
        assert isinstance(value, torch.Tensor) and value.item() == cost(exact)
        leaves = [t for values in vars(soft).values() for t in values]
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
        i = 0
        for name, values in vars(exact).items():
            for j in range(len(values)):
                bumped = Counts(**{k: list(v) for k, v in vars(exact).items()})
                getattr(bumped, name)[j] = values[j] + 1.0
                grad = 0.0 if grads[i] is None else grads[i].item()
                assert grad == pytest.approx(cost(bumped) - cost(exact)), (name, j)
                i += 1


def test_a_sublayer_gate_at_zero_costs_what_removing_the_sublayer_saves(hubert_ckpt):
    """A gate multiplies its whole sublayer, biases included, whatever the heads/units counts say."""
    base = load_base(hubert_ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    model.remove_attention(0)
    model.remove_ffn(1)
    soft = as_tensors(counts_of(base.config))
    soft.attention[0] = soft.attention[0] * 0
    soft.ffn[1] = soft.ffn[1] * 0
    assert parameter_count(base.config, soft).item() == model.num_parameters()
    assert mac_count(base.config, 1.0, soft).item() == count_macs(model, 1.0)


def test_a_low_rank_block_left_without_heads_runs_none_of_its_linears():
    layer = LayerConfig(0, 0, ranks={"q_proj": 3, "fc1": 2})
    config = ModelConfig(kind=HUBERT, embed_dim=16, head_dim=4, layers=[layer], conv_layers=[(4, 10, 5)],
                         conv_pos=4, conv_pos_groups=2)
    model = SpeechTransformer(config)
    assert mac_count(config, 0.2) == count_macs(model, 0.2)
    soft = as_tensors(counts_of(config))
    assert mac_count(config, 0.2, soft).item() > mac_count(config, 0.2)  # the down-projections of 3 and 2 rows


def test_gradients_reach_every_prunable_count(hubert_ckpt):
    config = load_base(hubert_ckpt).config
    soft = as_tensors(counts_of(config))
    (parameter_count(config, soft) + mac_count(config, 1.0, soft)).backward()
    for name, values in vars(soft).items():
        assert all(t.grad is not None and t.grad.item() > 0 for t in values), name


def test_counts_of_the_wrong_length_are_refused(hubert_ckpt):
    config = load_base(hubert_ckpt).config
    counts = counts_of(config)
    counts.heads = counts.heads[:1]
    with pytest.raises(ValueError, match="counts.heads has 1 entries; the config needs 2"):
        parameter_count(config, counts)
