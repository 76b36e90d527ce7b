"""WavLM as a base: our SpeechTransformer equals S3PRL's ``wavlm_local`` (relative position bias, its gate),
head pruning keeps the bias and gate of each kept head, and the layout round-trips to a file S3PRL loads."""

from __future__ import annotations

import pytest
import torch

from upstream_compressed.compress import base_identity, run_recipe
from upstream_compressed.delta import Structure, apply_delta, build_compressed, make_delta, read_delta, write_delta
from upstream_compressed.model import ModelConfig, SpeechTransformer
from upstream_compressed.model.convert import CheckpointError, Converted, load_base, to_s3prl_checkpoint
from upstream_compressed.model.formats import wavlm
from upstream_compressed.model.layers import factorize
from upstream_compressed.recipe import parse_recipe
from upstream_compressed.testing.wavlm_checkpoints import make_wavlm_checkpoint

from helpers import max_valid_difference, run_model

TOLERANCE = 1e-5

VARIANTS = {
    "bias+gate": {},
    "bias, no gate": {"gru_rel_pos": False},
    "no bias (gate unused)": {"relative_position_embedding": False},
    "no bias, no gate": {"relative_position_embedding": False, "gru_rel_pos": False},
    "pre-LN+normalize+gate": {"layer_norm_first": True, "normalize": True, "layers": 3, "extractor_mode": "layer_norm",
                              "conv_bias": True},
    "pre-LN, bias, no gate": {"layer_norm_first": True, "gru_rel_pos": False, "num_buckets": 9, "max_distance": 7},
}


def s3prl_states(hub, ckpt, wavs) -> list[torch.Tensor]:
    upstream = hub.wavlm_local(ckpt=str(ckpt)).eval()
    with torch.no_grad():
        return list(upstream([w.clone() for w in wavs])["hidden_states"])


def our_model(ckpt) -> SpeechTransformer:
    base = load_base(ckpt)
    return SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()


@pytest.fixture(scope="module")
def gated_ckpt(tmp_path_factory):
    """Three post-LN layers of three heads, with the gated relative position bias."""
    return make_wavlm_checkpoint(tmp_path_factory.mktemp("wavlm") / "wavlm.pt", layers=3)


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_hidden_states_match_s3prl(tmp_path, s3prl_hub, padded_batch, options):
    ckpt = make_wavlm_checkpoint(tmp_path / "wavlm.pt", **options)
    expected = s3prl_states(s3prl_hub, ckpt, padded_batch)
    model = our_model(ckpt)
    states, padding_mask = run_model(model, padded_batch)

    assert len(states) == len(expected) == model.config.num_layers + 1
    assert padding_mask.any(), "the batch must contain padding for this test to mean anything"
    for layer, (ours, theirs) in enumerate(zip(states, expected)):
        assert max_valid_difference(ours, theirs, padding_mask) < TOLERANCE, f"hidden state {layer}"


def test_the_bias_and_the_gate_change_the_states(gated_ckpt, padded_batch):
    """So the parity tests could not pass with either ignored."""
    reference, mask = run_model(our_model(gated_ckpt), padded_batch)
    for change in ("relative_position_bias.weight", "layers.1.attention.gate_scale"):
        model = our_model(gated_ckpt)
        with torch.no_grad():
            model.get_parameter(change).mul_(0.5)
        changed, _ = run_model(model, padded_batch)
        assert max_valid_difference(changed[-1], reference[-1], mask) > 1e-3, change


def test_load_base_detects_wavlm_and_reads_its_options(gated_ckpt):
    base = load_base(gated_ckpt)
    assert base.source_format == wavlm.NAME == "s3prl_wavlm"
    c = base.config
    assert (c.kind, c.relative_position_buckets, c.max_relative_distance, c.gated_relative_position) == \
        ("hubert", 12, 20, True)
    assert (c.num_layers, c.embed_dim, c.head_dim, c.relative_position_heads) == (3, 48, 16, 3)
    assert base.state_dict["relative_position_bias.weight"].shape == (12, 3)
    assert base.state_dict["layers.2.attention.gate_scale"].shape == (3,)
    assert set(base.extras["pretraining_weights"]) == {"mask_emb"}
    assert ModelConfig.from_dict(c.to_dict()) == c


def test_models_without_the_bias_keep_their_manifests(hubert_ckpt):
    """No new keys in a HuBERT config, not even after head pruning (head ids are WavLM's alone)."""
    model = our_model(hubert_ckpt)
    model.keep_heads(0, [2, 0])
    data = model.config.to_dict()
    assert not {"relative_position_buckets", "max_relative_distance", "gated_relative_position"} & set(data)
    assert all("head_ids" not in layer for layer in data["layers"])


# ------------------------------------------------------------------------------------- head pruning
def zeroed_heads_model(ckpt, kept: dict[int, list[int]]) -> SpeechTransformer:
    """The unpruned model with the removed heads' out_proj input columns zeroed: an independent check."""
    model = our_model(ckpt)
    head_dim = model.config.head_dim
    with torch.no_grad():
        for layer, heads in kept.items():
            for head in set(range(model.config.layers[layer].num_heads)) - set(heads):
                model.layers[layer].attention.out_proj.weight[:, head * head_dim:(head + 1) * head_dim] = 0
    return model


def test_head_pruning_equals_zeroing_the_removed_heads(tmp_path, padded_batch):
    """Different heads per layer, layer 0's pruned too (the shared bias keeps all its columns), reordered,
    and a layer left with none; pre-LN and post-LN."""
    kept = {0: [2, 0], 1: [1], 2: []}
    for options in ({}, {"layer_norm_first": True}):
        ckpt = make_wavlm_checkpoint(tmp_path / "wavlm.pt", layers=3, **options)
        pruned = our_model(ckpt)
        for layer, heads in kept.items():
            pruned.keep_heads(layer, heads)
        assert [layer.head_ids for layer in pruned.config.layers] == [[2, 0], [1], []]
        assert pruned.relative_position_bias.weight.shape == (12, 3)
        expected, mask = run_model(zeroed_heads_model(ckpt, kept), padded_batch)
        states, _ = run_model(pruned, padded_batch)
        for layer, (a, b) in enumerate(zip(states, expected)):
            assert max_valid_difference(a, b, mask) < TOLERANCE, (options, layer)


def test_repeated_head_pruning_composes_the_original_ids(gated_ckpt, padded_batch):
    pruned = our_model(gated_ckpt)
    pruned.keep_heads(1, [2, 0, 1])
    pruned.keep_heads(1, [2, 0])  # original heads 1 and 2
    pruned.remove_attention(2)
    assert pruned.config.layers[1].head_ids == [1, 2] and pruned.config.layers[2].head_ids is None
    model = zeroed_heads_model(gated_ckpt, {1: [1, 2], 2: []})
    with torch.no_grad():
        model.layers[2].attention.out_proj.bias.zero_()  # a removed sublayer leaves no bias either
    expected, mask = run_model(model, padded_batch)
    states, _ = run_model(pruned, padded_batch)
    for a, b in zip(states, expected):
        assert max_valid_difference(a, b, mask) < TOLERANCE


def test_head_ids_survive_a_delta_round_trip(tmp_path, gated_ckpt, padded_batch):
    base = load_base(gated_ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
    structure = Structure.identity(base.config)
    for layer, heads in ((0, [1]), (1, [2, 0])):
        model.keep_heads(layer, heads)
        structure.keep_heads(layer, heads, base_heads=3)
    delta = make_delta(base, base_identity(str(gated_ckpt), gated_ckpt, base), model, structure, {}, "headpruned")
    assert delta.tensors == {}, "slicing the base gives every tensor, the gate scales and shared bias included"
    path = write_delta(delta, tmp_path / "pruned.safetensors")
    rebuilt = build_compressed(read_delta(path), gated_ckpt)
    assert [layer.head_ids for layer in rebuilt.config.layers] == [[1], [2, 0], None]
    expected, mask = run_model(model, padded_batch)
    states, _ = run_model(rebuilt, padded_batch)
    assert all(torch.equal(a, b) for a, b in zip(states, expected))


def test_a_head_pruning_recipe_on_a_wavlm_base_rebuilds_to_the_zeroed_model(gated_ckpt, padded_batch):
    recipe = parse_recipe({"base": str(gated_ckpt), "steps": [
        {"method": "head_pruning", "ratio": 0.5, "criterion": "l1", "selection": "global"}]})
    delta = run_recipe(recipe)
    layers = delta.manifest["structure"]["layers"]
    kept = {i: origin["kept_heads"] if origin["kept_heads"] is not None else [0, 1, 2]
            for i, origin in enumerate(layers)}
    assert sum(map(len, kept.values())) == 5  # 4 of the 9 heads removed
    assert [layer.get("head_ids") for layer in delta.manifest["config"]["layers"]] == list(kept.values())
    expected, mask = run_model(zeroed_heads_model(gated_ckpt, kept), padded_batch)
    rebuilt = apply_delta(delta, load_base(gated_ckpt)).eval()
    states, _ = run_model(rebuilt, padded_batch)
    for a, b in zip(states, expected):
        assert max_valid_difference(a, b, mask) < TOLERANCE


# ------------------------------------------------------------------------------------- the layout
@pytest.mark.parametrize("options", [{}, {"relative_position_embedding": False}, {"layer_norm_first": True,
                                                                                   "gru_rel_pos": False}])
def test_round_trip_back_to_s3prl_format(tmp_path, s3prl_hub, padded_batch, options):
    ckpt = make_wavlm_checkpoint(tmp_path / "base.pt", **options)
    converted = load_base(ckpt)
    written = tmp_path / "written.pt"
    torch.save(to_s3prl_checkpoint(converted), written)

    original = torch.load(ckpt, weights_only=True)
    again = torch.load(written, weights_only=True)
    assert again["cfg"] == original["cfg"]
    assert again["model"].keys() == original["model"].keys()
    assert all(torch.equal(again["model"][k], v) for k, v in original["model"].items())
    before = s3prl_states(s3prl_hub, ckpt, padded_batch)
    after = s3prl_states(s3prl_hub, written, padded_batch)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_a_distilled_student_writes_back_without_the_teachers_extra_layers(tmp_path, s3prl_hub, padded_batch):
    """The unused gate tensors set aside for layers the student no longer has are left out (S3PRL loads strictly)."""
    converted = load_base(make_wavlm_checkpoint(tmp_path / "base.pt", layers=3, relative_position_embedding=False))
    model = SpeechTransformer.from_state_dict(converted.config, converted.state_dict).eval()
    model.layers = model.layers[:2]
    model.config.layers = model.config.layers[:2]
    written = tmp_path / "student.pt"
    torch.save(wavlm.write(Converted(model.config, model.state_dict(), wavlm.NAME, converted.extras)), written)
    theirs = s3prl_states(s3prl_hub, written, padded_batch)
    ours, mask = run_model(model, padded_batch)
    assert len(theirs) == 3
    for a, b in zip(ours, theirs):
        assert max_valid_difference(a, b, mask) < TOLERANCE


def _refusal(model: SpeechTransformer, converted: Converted) -> str:
    with pytest.raises(ValueError) as error:
        wavlm.write(Converted(model.config, model.state_dict(), converted.source_format, converted.extras))
    return str(error.value)


def test_write_refuses_what_s3prls_wavlm_cannot_build(gated_ckpt):
    converted = load_base(gated_ckpt)

    def fresh() -> SpeechTransformer:
        return SpeechTransformer.from_state_dict(converted.config, converted.state_dict)

    model = fresh()
    model.keep_heads(0, [0, 1])
    assert "same heads" in _refusal(model, converted)
    model = fresh()
    for layer in range(3):
        model.keep_heads(layer, [0, 1])
    assert "heads were pruned" in _refusal(model, converted)
    model = fresh()
    for layer in range(3):
        model.keep_heads(layer, [1, 0, 2])
    assert "reordered" in _refusal(model, converted)
    model = fresh()
    model.remove_ffn(1)
    assert "removed" in _refusal(model, converted)
    model = fresh()
    for layer in range(3):
        model.replace_linear(layer, "fc1", factorize(model.linear(layer, "fc1"), 2))
    assert "low-rank" in _refusal(model, converted)


@pytest.mark.parametrize("field,value", [("layer_type", "conformer"), ("activation_fn", "glu"),
                                         ("pos_conv_depth", 3), ("num_buckets", 2), ("extractor_mode", "group")])
def test_unsupported_wavlm_options_are_named(tmp_path, gated_ckpt, field, value):
    ckpt = torch.load(gated_ckpt, weights_only=True)
    ckpt["cfg"][field] = value
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=f"s3prl_wavlm.*cfg {field}"):
        load_base(tmp_path / "odd.pt")


@pytest.mark.parametrize("name", ["wavlm_base", "wavlm_base_plus", "wavlm_large"])
def test_known_wavlm_names_download_by_s3prls_own_path(tmp_path, monkeypatch, s3prl_hub, name):
    """The URL is the one S3PRL's own entry of that name asks for, fetched by S3PRL's downloader."""
    from s3prl.upstream.wavlm import hubconf
    import s3prl.util.download as download

    from upstream_compressed.bases import KNOWN_BASES, resolve_base

    asked = {}
    monkeypatch.setattr(hubconf, "wavlm_url", lambda **kwargs: asked.update(kwargs))
    getattr(hubconf, name)()
    assert KNOWN_BASES[name] == asked["ckpt"]

    local = make_wavlm_checkpoint(tmp_path / f"{name}.pt")  # what the download would have left in S3PRL's cache
    fetched = []
    monkeypatch.setattr(download, "_urls_to_filepaths", lambda url, refresh=False: fetched.append(url) or str(local))
    path = resolve_base(name)
    assert fetched == [KNOWN_BASES[name]] and path == local
    assert load_base(path).source_format == "s3prl_wavlm"
