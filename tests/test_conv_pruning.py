"""CNN channel pruning: exact sizes, the channels each criterion picks, small deltas that load as upstreams."""

from __future__ import annotations

import pytest
import torch
import yaml

from upstream_compressed.cli import main
from upstream_compressed.compress import run_recipe
from upstream_compressed.compress.conv_pruning import data_driven_channel_scores, keep_count
from upstream_compressed.compress.selection import random_scores
from upstream_compressed.delta import apply_delta, read_delta
from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import Converted, load_base, to_s3prl_checkpoint
from upstream_compressed.model.costs import mac_count, parameter_count
from upstream_compressed.profile import count_macs
from upstream_compressed.recipe import RecipeError, parse_recipe
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint, make_melhubert_checkpoint

from helpers import max_valid_difference, run_model


def compress(ckpt, **step):
    return run_recipe(parse_recipe({"base": str(ckpt), "steps": [{"method": "conv_pruning", **step}]}))


def kept_channels(delta) -> list[list[int] | None]:
    return delta.manifest["structure"]["conv_channels"]


@pytest.mark.parametrize("ratio,kept", [(0.25, 24), (0.5, 16), (0.75, 8)])
@pytest.mark.parametrize("ckpt_name", ["hubert_ckpt", "distiller_ckpt"])
def test_sizes_after_pruning_are_the_analytic_ones(ckpt_name, ratio, kept, request):
    ckpt = request.getfixturevalue(ckpt_name)
    delta = compress(ckpt, ratio=ratio)
    config = delta.config
    assert [channels for channels, _, _ in config.conv_layers] == [kept] * 7  # 32 channels each, the last too
    model = apply_delta(delta, load_base(ckpt))
    assert delta.manifest["params"]["compressed"] == model.num_parameters() == parameter_count(config)
    assert delta.manifest["macs"]["compressed"] == count_macs(model, 10.0) == mac_count(config, 10.0)
    # Inner convs shrink in both directions, so their MACs fall by about the square of what is kept.
    base = load_base(ckpt).config
    inner = lambda c: mac_count(c, 10.0) - mac_count(c.__class__(**{**c.__dict__, "conv_layers": c.conv_layers[:1]}), 10.0)  # noqa: E731
    assert inner(config) < inner(base) * (kept / 32) ** 2 * 1.01


def test_round_keeps_half_up_and_at_least_one_channel():
    assert [keep_count(32, r) for r in (0.0, 0.25, 0.5, 0.74, 0.99)] == [32, 24, 16, 8, 1]
    assert keep_count(5, 0.5) == 3 and keep_count(3, 0.5) == 2 and keep_count(1, 0.9) == 1


def test_l1_keeps_the_filters_of_largest_l1_norm(hubert_ckpt):
    delta = compress(hubert_ckpt, ratio=0.5, conv_layers=[0, 3, 6])
    state = load_base(hubert_ckpt).state_dict
    kept = kept_channels(delta)
    for i in (0, 3, 6):
        norms = state[f"feature_extractor.convs.{i}.weight"].abs().sum(dim=(1, 2))
        assert kept[i] == sorted(norms.argsort(descending=True)[:16].tolist())
    assert kept[1] is None and kept[2] is None  # the layers not named keep everything


def test_random_follows_its_seed_and_differs_from_l1(hubert_ckpt):
    first = kept_channels(compress(hubert_ckpt, ratio=0.5, criterion="random", seed=3, conv_layers=[2, 5]))
    scores = random_scores([32, 32], 3)
    assert first[2] == sorted(scores[0].argsort(descending=True)[:16].tolist())
    assert first[5] == sorted(scores[1].argsort(descending=True)[:16].tolist())
    assert kept_channels(compress(hubert_ckpt, ratio=0.5, criterion="random", seed=4, conv_layers=[2, 5])) != first
    assert kept_channels(compress(hubert_ckpt, ratio=0.5, conv_layers=[2, 5])) != first


def test_data_driven_scores_channels_that_carry_nothing_zero(hubert_ckpt, audio_dir):
    """A filter of zeros (no bias) outputs GELU(0) = 0: removing it changes nothing, so its score is 0,
    in an inner layer and in the last one (whose channels meet the feature LayerNorm)."""
    base = load_base(hubert_ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    with torch.no_grad():
        model.feature_extractor.convs[2].weight[[3, 7]] = 0
        model.feature_extractor.convs[6].weight[[0, 30]] = 0
    scores = data_driven_channel_scores(model, [2, 6], str(audio_dir), max_utterances=4, max_seconds=1.0)
    for layer_scores, dead in zip(scores, ([3, 7], [0, 30])):
        assert layer_scores.shape == (32,)
        assert torch.all(layer_scores[dead] == 0)
        alive = [j for j in range(32) if j not in dead]
        assert torch.all(layer_scores[alive] > 0)
    assert all(p.requires_grad for p in model.parameters())  # scoring leaves the model trainable


def test_data_driven_gates_the_first_layer_after_its_group_norm(hubert_ckpt, audio_dir):
    """Removing a channel removes its normalised output: a gate before the per-channel GroupNorm would
    be normalised away and score every channel of layer 0 about zero."""
    base = load_base(hubert_ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    first, inner = data_driven_channel_scores(model, [0, 2], str(audio_dir), max_utterances=4, max_seconds=1.0)
    assert first.min() > 0.05 * inner.median()


def test_data_driven_recipe_runs_and_keeps_the_asked_for_count(hubert_ckpt, audio_dir):
    delta = compress(hubert_ckpt, ratio=0.25, criterion="data_driven", audio=str(audio_dir), max_utterances=3,
                     max_seconds=1.0, conv_layers=[1, 6])
    assert [len(k) if k else None for k in kept_channels(delta)] == [None, 24, None, None, None, None, 24]


def test_compress_cli_writes_a_delta_of_indices_that_loads_as_hubert_convpruned(tmp_path, hubert_ckpt, s3prl_hub,
                                                                                 padded_batch):
    recipe = tmp_path / "conv.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(hubert_ckpt),
                                      "steps": [{"method": "conv_pruning", "ratio": 0.5, "criterion": "l1"}]}))
    out = tmp_path / "conv.safetensors"
    assert main(["compress", str(recipe), "-o", str(out)]) == 0
    delta = read_delta(out)
    assert delta.technique == "convpruned"
    assert delta.tensors == {}, "pruning without recovery stores only indices"
    assert out.stat().st_size < 0.05 * hubert_ckpt.stat().st_size
    expected_model = apply_delta(delta, load_base(hubert_ckpt)).eval()
    expected, mask = run_model(expected_model, padded_batch)
    for entry in (s3prl_hub.hubert_convpruned, s3prl_hub.compressed_local):
        upstream = entry(ckpt=str(out)).eval()
        with torch.no_grad():
            states = upstream(padded_batch)["hidden_states"]
        assert len(states) == len(expected)
        for a, b in zip(states, expected):
            assert max_valid_difference(a, b, mask) < 1e-6
    with pytest.raises(Exception, match="convpruned"):
        s3prl_hub.hubert_headpruned(ckpt=str(out))


def test_pruning_with_recovery_stores_the_retrained_tensors(hubert_ckpt, audio_dir):
    recovery = {"audio": str(audio_dir), "steps": 1, "batch_size": 2, "max_seconds": 1.0, "device": "cpu"}
    delta = compress(hubert_ckpt, ratio=0.5, recovery=recovery)
    assert "feature_extractor.convs.1.weight" in delta.tensors
    assert delta.tensors["feature_extractor.convs.1.weight"].shape == (16, 16, 3)
    assert apply_delta(delta, load_base(hubert_ckpt)).config == delta.config


def test_a_conv_pruned_hubert_converts_back_to_s3prl_and_computes_the_same(tmp_path, hubert_ckpt, s3prl_hub,
                                                                           padded_batch):
    delta = compress(hubert_ckpt, ratio=0.5, conv_layers=[0, 2, 6])  # non-uniform channels: 16, 32, 16, ..., 16
    base = load_base(hubert_ckpt)
    model = apply_delta(delta, base).eval()
    written = tmp_path / "conv_pruned_s3prl.pt"
    torch.save(to_s3prl_checkpoint(Converted(model.config, model.state_dict(), base.source_format, base.extras)),
               written)
    theirs = s3prl_hub.hubert_local(ckpt=str(written)).eval()
    with torch.no_grad():
        expected = theirs([w.clone() for w in padded_batch])["hidden_states"]
    ours, mask = run_model(model, padded_batch)
    for a, b in zip(ours, expected):
        assert max_valid_difference(a, b, mask) < 1e-5


def test_removed_sublayers_are_refused_by_the_s3prl_conversion(hubert_ckpt):
    base = load_base(hubert_ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    model.remove_ffn(1)
    with pytest.raises(ValueError, match=r"layers \[1\] have a removed attention or FFN sublayer.*compressed_local"):
        to_s3prl_checkpoint(Converted(model.config, model.state_dict(), base.source_format, base.extras))


@pytest.mark.parametrize("step,message", [
    ({}, r"steps\[0\]\.ratio is missing"),
    ({"ratio": 1.0}, r"steps\[0\]\.ratio: 1\.0 is outside \[0\.0, 1\.0\)"),
    ({"ratio": 0.5, "criterion": "magic"}, r"steps\[0\]\.criterion: 'magic'"),
    ({"ratio": 0.5, "criterion": "data_driven"}, r"steps\[0\]\.audio: the data_driven criterion needs"),
    ({"ratio": 0.5, "conv_layers": [0, 0]}, r"steps\[0\]\.conv_layers: expected a non-empty list of distinct"),
    ({"ratio": 0.5, "conv_layers": "all"}, r"steps\[0\]\.conv_layers"),
    ({"ratio": 0.5, "layers": [0]}, r"steps\[0\]\.layers: conv_pruning prunes front-end conv layers.*conv_layers"),
    ({"ratio": 0.5, "selection": "global"}, r"unknown option\(s\) \['selection'\]"),
    ({"ratio": 0.5, "seed": 1.5}, r"steps\[0\]\.seed"),
    ({"ratio": 0.5, "batch_size": 0}, r"steps\[0\]\.batch_size"),
    ({"ratio": 0.5, "recovery": {"steps": 3}}, r"steps\[0\]\.recovery: expected a mapping"),
])
def test_bad_options_are_refused_naming_the_field(step, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"base": "/does/not/matter.pt", "steps": [{"method": "conv_pruning", **step}]})


def test_what_only_the_base_can_refute_is_refused_naming_the_field(tmp_path, hubert_ckpt):
    with pytest.raises(RecipeError, match=r"steps\[0\]\.conv_layers: \[7\] name conv layers beyond the front end's 7"):
        compress(hubert_ckpt, ratio=0.5, conv_layers=[1, 7])
    direct = make_hubert_checkpoint(tmp_path / "direct.pt", dim=32)  # conv channels == embed_dim: no projection
    with pytest.raises(RecipeError, match=r"steps\[0\]\.conv_layers: the last conv layer \(6\) feeds the encoder"):
        compress(direct, ratio=0.5, conv_layers=[6])
    default = kept_channels(compress(direct, ratio=0.5))  # by default the last layer is left alone
    assert len(default) == 6 and all(len(kept) == 16 for kept in default)
    with pytest.raises(RecipeError, match=r"steps\[0\]\.method: conv_pruning needs a convolutional front end"):
        compress(make_melhubert_checkpoint(tmp_path / "mel.pt"), ratio=0.5)
