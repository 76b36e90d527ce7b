"""Conv channels and whole sublayers removed physically compute what the zeroed original computes."""

from __future__ import annotations

import json

import pytest
import torch

from upstream_compressed.compress import base_identity
from upstream_compressed.delta import Structure, apply_delta, make_delta, read_delta, slice_base, write_delta
from upstream_compressed.model import LayerConfig, ModelConfig, SpeechTransformer
from upstream_compressed.model.convert import load_base
from upstream_compressed.testing.checkpoints import make_distiller_checkpoint, make_hubert_checkpoint

from helpers import max_valid_difference, run_model


def base_model(ckpt) -> SpeechTransformer:
    converted = load_base(ckpt)
    return SpeechTransformer.from_state_dict(converted.config, converted.state_dict).eval()


def assert_same_states(model, expected_model, batch, tolerance=1e-5) -> None:
    expected, mask = run_model(expected_model, batch)
    states, _ = run_model(model, batch)
    assert len(states) == len(expected)
    for a, b in zip(states, expected):
        assert max_valid_difference(a, b, mask) < tolerance


def assert_rebuilds(model: SpeechTransformer) -> None:
    """The config describes the pruned model: a model built from it takes its state dict, keys and shapes."""
    config = ModelConfig.from_dict(json.loads(json.dumps(model.config.to_dict())))
    rebuilt = SpeechTransformer(config)
    rebuilt.load_state_dict(model.state_dict())


@pytest.fixture(scope="module")
def pre_ln_ckpt(tmp_path_factory):
    return make_hubert_checkpoint(tmp_path_factory.mktemp("preln") / "pre_ln.pt", layer_norm_first=True, seed=3)


@pytest.fixture(scope="module")
def layer_norm_ckpt(tmp_path_factory):
    return make_hubert_checkpoint(tmp_path_factory.mktemp("lnmode") / "ln_mode.pt", extractor_mode="layer_norm", seed=4)


# ------------------------------------------------------------------------------------- sublayers
@pytest.mark.parametrize("which", ["post_ln", "pre_ln"])
def test_removing_attention_equals_zeroing_its_projections_and_bias(which, hubert_ckpt, pre_ln_ckpt, padded_batch):
    ckpt = hubert_ckpt if which == "post_ln" else pre_ln_ckpt
    zeroed = base_model(ckpt)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            zeroed.linear(1, name).weight.zero_()
            zeroed.linear(1, name).bias.zero_()
    pruned = base_model(ckpt)
    pruned.remove_attention(1)
    assert pruned.layers[1].attention is None
    assert not any(".attention." in key for key in pruned.state_dict() if key.startswith("layers.1."))
    assert pruned.config.layers[1].num_heads == 0 and not pruned.config.layers[1].attention
    assert_same_states(pruned, zeroed, padded_batch)
    assert_rebuilds(pruned)


@pytest.mark.parametrize("which", ["post_ln", "pre_ln"])
def test_removing_the_ffn_equals_zeroing_fc2_and_its_bias(which, hubert_ckpt, pre_ln_ckpt, padded_batch):
    ckpt = hubert_ckpt if which == "post_ln" else pre_ln_ckpt
    zeroed = base_model(ckpt)
    with torch.no_grad():
        zeroed.linear(0, "fc2").weight.zero_()
        zeroed.linear(0, "fc2").bias.zero_()
    pruned = base_model(ckpt)
    pruned.remove_ffn(0)
    assert pruned.layers[0].feed_forward is None
    assert not any("feed_forward" in key for key in pruned.state_dict() if key.startswith("layers.0."))
    assert_same_states(pruned, zeroed, padded_batch)
    assert_rebuilds(pruned)


def test_a_layer_without_both_sublayers_is_its_norms(hubert_ckpt, pre_ln_ckpt):
    post = base_model(hubert_ckpt)
    post.remove_attention(0)
    post.remove_ffn(0)
    pre = base_model(pre_ln_ckpt)
    pre.remove_attention(0)
    pre.remove_ffn(0)
    x = torch.randn(2, 7, post.config.embed_dim)
    with torch.no_grad():
        layer = post.layers[0]  # post-LN: both LayerNorms still apply, in order
        assert torch.allclose(layer(x), layer.final_norm(layer.attention_norm(x)), atol=1e-6)
        assert torch.equal(pre.layers[0](x), x)  # pre-LN: the residual path alone
    # Both norms stay, so a post-LN layer's parameters are exactly its two LayerNorms.
    assert sum(p.numel() for p in layer.parameters()) == 4 * post.config.embed_dim


def test_removed_sublayers_refuse_what_needs_them(hubert_ckpt):
    model = base_model(hubert_ckpt)
    model.remove_attention(0)
    model.remove_ffn(1)
    with pytest.raises(ValueError, match="no attention sublayer"):
        model.keep_heads(0, [])
    with pytest.raises(ValueError, match="no FFN sublayer"):
        model.keep_units(1, [])
    with pytest.raises(ValueError, match="removed"):
        model.linear(0, "q_proj")
    with pytest.raises(ValueError, match="no attention sublayer left"):
        model.remove_attention(0)
    assert model.config.layers[0].linear_names == ("fc1", "fc2")
    assert model.config.layers[1].linear_names == ("q_proj", "k_proj", "v_proj", "out_proj")


def test_removing_a_low_rank_sublayer_forgets_its_ranks(hubert_ckpt, padded_batch):
    from upstream_compressed.model.layers import factorize

    model = base_model(hubert_ckpt)
    model.replace_linear(0, "q_proj", factorize(model.linear(0, "q_proj"), 4))
    model.remove_attention(0)
    assert model.config.layers[0].ranks == {}
    assert_rebuilds(model)


def test_layer_config_validates_removed_sublayers():
    with pytest.raises(ValueError, match="no heads"):
        LayerConfig(num_heads=2, ffn_dim=8, attention=False)
    with pytest.raises(ValueError, match="no units"):
        LayerConfig(num_heads=2, ffn_dim=8, ffn=False)
    with pytest.raises(ValueError, match="removed sublayer"):
        LayerConfig(num_heads=0, ffn_dim=8, attention=False, ranks={"q_proj": 2})
    with pytest.raises(ValueError, match="removed sublayer"):
        LayerConfig(num_heads=2, ffn_dim=0, ffn=False, sparse=["fc1"])


def test_manifests_of_unpruned_models_stay_as_they_were(hubert_ckpt):
    config = load_base(hubert_ckpt).config
    data = config.to_dict()
    assert all(set(layer) == {"num_heads", "ffn_dim", "ranks"} for layer in data["layers"])
    assert "feature_projection" not in data
    model = SpeechTransformer(config)
    model.remove_ffn(1)
    model.keep_channels(2, [0, 1])
    data = model.config.to_dict()
    assert data["layers"][1]["ffn"] is False and "attention" not in data["layers"][1]
    assert data["conv_layers"][2] == [2, 3, 2]
    assert ModelConfig.from_dict(data) == model.config


# ----------------------------------------------------------------------------------- conv channels
@pytest.mark.parametrize("conv_layer", [0, 2])
def test_removing_channels_of_an_inner_conv_equals_zeroing_their_use(conv_layer, hubert_ckpt, padded_batch):
    """In the default mode an inner conv's channels are independent (per-channel GroupNorm on the
    first conv, none on the others), so removing one equals zeroing the next conv's inputs from it."""
    keep = [5, 0, 31, 7, 12, 3, 20]
    drop = sorted(set(range(32)) - set(keep))
    zeroed = base_model(hubert_ckpt)
    with torch.no_grad():
        zeroed.feature_extractor.convs[conv_layer + 1].weight[:, drop] = 0
    pruned = base_model(hubert_ckpt)
    pruned.keep_channels(conv_layer, keep)
    assert pruned.config.conv_layers[conv_layer][0] == len(keep)
    assert pruned.feature_extractor.convs[conv_layer].weight.shape[0] == len(keep)
    assert pruned.feature_extractor.convs[conv_layer + 1].weight.shape[1] == len(keep)
    if conv_layer == 0:
        assert pruned.feature_extractor.norms[0].weight.shape == (len(keep),)
    assert_same_states(pruned, zeroed, padded_batch)
    assert_rebuilds(pruned)


def test_removing_last_conv_channels_equals_zeroing_their_projection_columns(distiller_ckpt, padded_batch):
    """DistilHuBERT has no feature LayerNorm, so the last conv's channels meet only the projection."""
    keep = [1, 30, 4, 9, 17]
    drop = sorted(set(range(32)) - set(keep))
    zeroed = base_model(distiller_ckpt)
    assert zeroed.feature_norm is None
    with torch.no_grad():
        zeroed.feature_projection.weight[:, drop] = 0
    pruned = base_model(distiller_ckpt)
    pruned.keep_channels(6, keep)
    assert pruned.feature_projection.weight.shape == (pruned.config.embed_dim, len(keep))
    assert_same_states(pruned, zeroed, padded_batch)
    assert_rebuilds(pruned)


@pytest.mark.parametrize("which", ["default", "layer_norm"])
def test_keeping_every_channel_in_another_order_changes_nothing(which, hubert_ckpt, layer_norm_ckpt, padded_batch):
    """Norms over channels (LayerNorm mode, the feature LayerNorm) are permutation-equivariant, so a
    reordering is exact on every layer, the last included: it checks that every slice follows the order."""
    ckpt = hubert_ckpt if which == "default" else layer_norm_ckpt
    original = base_model(ckpt)
    model = base_model(ckpt)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0)).tolist()
    for conv_layer in range(len(model.config.conv_layers)):
        model.keep_channels(conv_layer, order)
    assert_same_states(model, original, padded_batch)
    assert_rebuilds(model)


def test_pruning_layer_norm_mode_and_the_last_conv_layer_slices_their_norms(layer_norm_ckpt, padded_batch):
    model = base_model(layer_norm_ckpt)
    original = base_model(layer_norm_ckpt)
    keep = [3, 8, 1, 30]
    model.keep_channels(1, keep)
    model.keep_channels(6, keep)
    assert torch.equal(model.feature_extractor.norms[1].weight, original.feature_extractor.norms[1].weight[keep])
    assert torch.equal(model.feature_norm.bias, original.feature_norm.bias[keep])
    assert torch.equal(model.feature_projection.weight, original.feature_projection.weight[:, keep])
    assert torch.equal(model.feature_extractor.convs[2].weight, original.feature_extractor.convs[2].weight[:, keep])
    states, _ = run_model(model, padded_batch)
    assert all(torch.isfinite(s).all() for s in states)
    assert_rebuilds(model)


def test_conv_channel_errors_name_the_problem(tmp_path, hubert_ckpt):
    model = base_model(hubert_ckpt)
    with pytest.raises(ValueError, match="at least one channel"):
        model.keep_channels(0, [])
    with pytest.raises(ValueError, match="distinct indices below 32"):
        model.keep_channels(0, [1, 1])
    with pytest.raises(ValueError, match="distinct indices below 32"):
        model.keep_channels(0, [32])
    with pytest.raises(ValueError, match="does not exist"):
        model.keep_channels(7, [0])
    # A front end as wide as the encoder feeds it directly: no projection to slice.
    direct = base_model(make_hubert_checkpoint(tmp_path / "direct.pt", dim=32, heads=4))
    assert direct.feature_projection is None
    with pytest.raises(ValueError, match="cannot be pruned"):
        direct.keep_channels(6, [0, 1])
    direct.keep_channels(5, [0, 1])  # the others can


def test_pruning_the_last_conv_to_the_encoder_width_keeps_the_projection(tmp_path, padded_batch):
    wide = "[(80,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] + [(80,2,2)]"
    model = base_model(make_hubert_checkpoint(tmp_path / "wide.pt", conv_layers=wide))
    model.keep_channels(6, list(range(64)))  # now conv_dim == embed_dim == 64, but the projection stays
    assert model.config.conv_dim == model.config.embed_dim and model.config.feature_projection is True
    assert_rebuilds(model)
    with pytest.raises(ValueError, match="feature_projection cannot be false"):
        ModelConfig.from_dict({**model.config.to_dict(), "feature_projection": False, "embed_dim": 48})


# --------------------------------------------------------------------------------------- deltas
def prune_everything(model: SpeechTransformer, structure: Structure, base_config: ModelConfig) -> None:
    """Conv channels (twice on one layer, so indices compose), the last conv, heads, units, sublayers."""
    for conv_layer, keep in ((0, list(range(0, 32, 2))), (3, [9, 2, 30, 4]), (6, list(range(5, 25)))):
        model.keep_channels(conv_layer, keep)
        structure.keep_channels(conv_layer, keep, base_channels=base_config.conv_layers[conv_layer][0])
    model.keep_channels(0, [15, 0, 3])  # indices into the 16 kept above
    structure.keep_channels(0, [15, 0, 3], base_channels=base_config.conv_layers[0][0])
    model.keep_heads(0, [3, 1])
    structure.keep_heads(0, [3, 1], base_heads=4)
    model.remove_ffn(0)
    structure.remove_ffn(0)
    model.remove_attention(1)
    structure.remove_attention(1)
    model.keep_units(1, list(range(0, 128, 3)))
    structure.keep_units(1, list(range(0, 128, 3)), base_units=128)


@pytest.mark.parametrize("ckpt_name", ["hubert_ckpt", "distiller_ckpt"])
def test_delta_of_a_conv_pruned_sublayer_removed_model_stores_only_indices(ckpt_name, request, tmp_path, padded_batch):
    ckpt = request.getfixturevalue(ckpt_name)
    base = load_base(ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
    structure = Structure.identity(base.config)
    prune_everything(model, structure, base.config)
    assert structure.conv_channels[0] == [30, 0, 6]  # composed: 15th, 0th and 3rd of 0, 2, 4, ...
    assert structure.conv_channels[1] is None
    identity = base_identity(str(ckpt), ckpt, base)
    delta = make_delta(base, identity, model, structure, {"base": str(ckpt), "steps": []}, "convpruned")
    assert delta.tensors == {}, "slicing the base gives every tensor: nothing was retrained"
    assert set(slice_base(base, structure)) == set(model.state_dict())
    path = write_delta(delta, tmp_path / "pruned.safetensors")
    read = read_delta(path)
    assert read.structure == structure
    rebuilt = apply_delta(read, base)
    assert rebuilt.config == model.config
    assert_same_states(rebuilt, model, padded_batch, tolerance=1e-12)

    with torch.no_grad():  # retrain one tensor: only it is stored
        model.feature_extractor.convs[3].weight.mul_(0.5)
    delta = make_delta(base, identity, model, structure, {"base": str(ckpt), "steps": []}, "convpruned")
    assert sorted(delta.tensors) == ["feature_extractor.convs.3.weight"]
    rebuilt = apply_delta(read_delta(write_delta(delta, tmp_path / "retrained.safetensors")), base)
    assert_same_states(rebuilt, model, padded_batch, tolerance=1e-12)


def test_structures_without_the_new_fields_read_and_write_as_before():
    old = {"layers": [{"source_layer": 0, "kept_heads": None, "kept_units": [1, 0]}]}
    structure = Structure.from_dict(old)
    assert structure.to_dict() == old
    structure.remove_attention(0)
    structure.keep_channels(2, [1, 0], base_channels=4)
    data = structure.to_dict()
    assert data["conv_channels"] == [None, None, [1, 0]]
    assert data["layers"][0] == {"source_layer": 0, "kept_heads": [], "kept_units": [1, 0], "attention": False}
    assert Structure.from_dict(json.loads(json.dumps(data))) == structure


def test_a_structure_that_does_not_fit_the_base_conv_is_refused(hubert_ckpt):
    from upstream_compressed.delta import DeltaError

    base = load_base(hubert_ckpt)
    structure = Structure.identity(base.config)
    structure.conv_channels = [[0, 40]]
    with pytest.raises(DeltaError, match="conv layer 0 do not fit the base"):
        slice_base(base, structure)
    structure.conv_channels = [None] * 8
    with pytest.raises(DeltaError, match="8 conv layers, but the base has 7"):
        slice_base(base, structure)


def test_pruning_a_distiller_keeps_its_prediction_heads(tmp_path, padded_batch):
    ckpt = make_distiller_checkpoint(tmp_path / "d.ckpt", layers=2, pred_layer_id=(1, 2))
    model = base_model(ckpt)
    model.remove_attention(0)
    model.keep_channels(6, [0, 1, 2])
    states, _ = run_model(model, padded_batch)
    assert len(states) == model.config.num_hidden_states == 5
