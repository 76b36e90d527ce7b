"""torchaudio's wav2vec2 layout (DPHuBERT's checkpoints) as a base: parity, round trips, upstream, compression.

The reference is torchaudio's own ``Wav2Vec2Model`` (``torchaudio.models.wav2vec2_model``); pruned
structures that its factory cannot build are made by editing its modules physically (see
:mod:`upstream_compressed.testing.torchaudio_checkpoints`). DPHuBERT's hidden states are
``[projected features] + torchaudio's extract_features`` (its ``Encoder.extract_features`` returns
``[x] + interm``), so ours are compared as: state 0 with torchaudio's ``Encoder._preprocess`` output,
states 1..L with ``extract_features``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from upstream_compressed.compress import run_recipe
from upstream_compressed.delta import DeltaError, load_compressed, write_delta
from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.config import TORCHAUDIO
from upstream_compressed.model.layers import factorize
from upstream_compressed.model.formats import torchaudio as torchaudio_layout
from upstream_compressed.model.convert import (TORCHAUDIO_FORMAT, CheckpointError, Converted, detect_format, load_base,
                                               to_s3prl_checkpoint)
from upstream_compressed.recipe import parse_recipe
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint
from upstream_compressed.testing.torchaudio_checkpoints import (
    TINY_CONV,
    dphubert_config,
    load_torchaudio_reference,
    make_torchaudio_checkpoint,
    stock_config,
    torchaudio_reference,
)

TOLERANCE = 1e-5
PRUNED_CONV = [(channels - 3 - i % 2, kernel, stride) for i, (channels, kernel, stride) in enumerate(TINY_CONV)]


def pruned_post_ln() -> dict:
    """Per-layer heads and units, an attention and an FFN sublayer removed, conv channels pruned (post-LN)."""
    # Layer 2 keeps a head count beside use_attention False, as DPHuBERT may: the flag wins.
    return dphubert_config(stock_config(), heads=[3, 1, 2], ffn=[40, 13, 7], use_attention=[True, True, False],
                           use_feed_forward=[True, False, True], conv_layers=PRUNED_CONV)


def pruned_pre_ln() -> dict:
    stock = stock_config(layers=4, extractor_mode="layer_norm", layer_norm_first=True, conv_bias=True)
    return dphubert_config(stock, heads=[2, 0, 3, 1], ffn=[0, 21, 40, 5], use_attention=[True, False, True, True],
                           use_feed_forward=[False, True, True, True], conv_layers=PRUNED_CONV)


VARIANTS = {  # name: (config, make_torchaudio_checkpoint options)
    "stock_post_ln": (stock_config(), {}),
    "stock_pre_ln_layer_norm": (stock_config(extractor_mode="layer_norm", layer_norm_first=True, conv_bias=True,
                                             conv_pos=16, conv_pos_groups=4), {"pos_conv": "weight_norm"}),
    "dphubert_unpruned": (dphubert_config(stock_config()), {"pos_conv": "weight_norm"}),
    # DPHuBERT's teacher, converted from torchaudio's own model: its lists, but no dummy_weight.
    "dphubert_teacher": (dphubert_config(stock_config()), {"pos_conv": "weight_norm", "dummy_weight": False}),
    "dphubert_pruned_post_ln": (pruned_post_ln(), {"pos_conv": "weight_norm", "scale_features": True}),
    "dphubert_pruned_pre_ln": (pruned_pre_ln(), {"scale_features": True}),
}


def torchaudio_states(model, wavs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """DPHuBERT's hidden states from a stock torchaudio model, and the valid-frame counts it computes."""
    lengths = torch.tensor([len(w) for w in wavs])
    batch = pad_sequence(wavs, batch_first=True)
    with torch.no_grad():
        layers, frames = model.extract_features(batch, lengths)
        features, _ = model.feature_extractor(batch, lengths)
        projected, _ = model.encoder._preprocess(features, frames)
    return [projected, *layers], frames


def our_states(converted: Converted, wavs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    model = SpeechTransformer.from_state_dict(converted.config, converted.state_dict).eval()
    with torch.no_grad():
        return model(pad_sequence(wavs, batch_first=True), torch.tensor([len(w) for w in wavs]))


def assert_same_states(ours: list[torch.Tensor], theirs: list[torch.Tensor], padding: torch.Tensor) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, f"hidden state {i}"
        assert (a - b).abs()[~padding].max().item() < TOLERANCE, f"hidden state {i}"


@pytest.fixture
def variant_ckpt(request, tmp_path):
    config, options = VARIANTS[request.param]
    return make_torchaudio_checkpoint(tmp_path / f"{request.param}.pth", config, **options)


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("variant_ckpt", list(VARIANTS), indirect=True)
def test_hidden_states_match_torchaudio_on_a_padded_batch(variant_ckpt, padded_batch):
    converted = load_base(variant_ckpt)
    assert converted.source_format == TORCHAUDIO_FORMAT and converted.config.kind == TORCHAUDIO
    theirs, frames = torchaudio_states(load_torchaudio_reference(variant_ckpt), padded_batch)
    ours, padding = our_states(converted, padded_batch)

    assert len(ours) == converted.config.num_hidden_states == converted.config.num_layers + 1
    assert padding.any(), "the batch must contain padding for this test to mean anything"
    assert torch.equal(~padding, torch.arange(padding.shape[1])[None, :] < frames[:, None])
    assert_same_states(ours, theirs, padding)
    assert all(bool((state[padding] == 0).all()) for state in ours[:1])  # padded features are zeroed, as there


def test_pruned_reference_really_is_pruned(tmp_path):
    """The edited stock model has the per-layer sizes, removed sublayers and feature scale the config says."""
    path = make_torchaudio_checkpoint(tmp_path / "p.pth", pruned_post_ln(), scale_features=True)
    layers = load_torchaudio_reference(path).encoder.transformer.layers
    assert [layer.attention.q_proj.out_features for layer in layers[:2]] == [48, 16]
    assert layers[0].feed_forward.intermediate_dense.out_features == 40
    converted = load_base(path)
    assert [(l.num_heads, l.ffn_dim, l.attention, l.ffn) for l in converted.config.layers] == [
        (3, 40, True, True), (1, 0, True, False), (0, 7, False, True)]
    assert converted.config.conv_layers == PRUNED_CONV and converted.config.feature_scale
    scale = converted.state_dict["feature_scale"]
    assert scale.shape == (PRUNED_CONV[-1][0],) and bool((scale != 1).all())


def test_frame_count_follows_torchaudio_for_utterances_shorter_than_a_frame(tmp_path):
    """torchaudio floors (lengths - kernel) / stride and clamps at 0; the distiller's trunc would give 1 frame."""
    converted = load_base(make_torchaudio_checkpoint(tmp_path / "s.pth"))
    model = SpeechTransformer.from_state_dict(converted.config, converted.state_dict)
    reference = torchaudio_reference(stock_config())
    lengths = torch.tensor([399, 400, 719, 720, 3000])
    _, frames = reference.feature_extractor(torch.zeros(5, 3000), lengths)
    mask = model.frame_padding_mask(lengths, 3000, 9)
    assert frames.tolist()[:2] == [0, 1]
    assert (~mask).sum(1).tolist() == frames.tolist()


# -------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("variant_ckpt", list(VARIANTS), indirect=True)
def test_round_trip_ours_to_torchaudio_and_back_is_exact(variant_ckpt, tmp_path):
    converted = load_base(variant_ckpt)
    written = tmp_path / "written.pth"
    torch.save(to_s3prl_checkpoint(converted), written)
    again = load_base(written)
    assert again.config == converted.config
    assert again.state_dict.keys() == converted.state_dict.keys()
    assert all(torch.equal(again.state_dict[k], v) for k, v in converted.state_dict.items())
    # ... and the file itself comes back: same config, same tensors under the same names.
    original, rewritten = (torch.load(p, weights_only=True) for p in (variant_ckpt, written))
    assert rewritten["config"] == original["config"]
    assert rewritten["state_dict"].keys() == original["state_dict"].keys()
    assert all(torch.equal(rewritten["state_dict"][k], v) for k, v in original["state_dict"].items())


def test_a_stock_file_written_back_loads_in_torchaudio_itself(tmp_path, padded_batch):
    from torchaudio.models import wav2vec2_model

    converted = load_base(make_torchaudio_checkpoint(tmp_path / "s.pth"))
    written = to_s3prl_checkpoint(converted)
    model = wav2vec2_model(**written["config"]).eval()
    model.load_state_dict(written["state_dict"], strict=True)
    theirs, _ = torchaudio_states(model, padded_batch)
    ours, padding = our_states(converted, padded_batch)
    assert_same_states(ours, theirs, padding)


def test_a_head_pruned_stock_model_is_written_in_dphubert_s_layout(tmp_path, padded_batch):
    """Per-layer heads need DPHuBERT's lists; the file it gives computes the same in the edited stock model."""
    converted = load_base(make_torchaudio_checkpoint(tmp_path / "s.pth"))
    model = SpeechTransformer.from_state_dict(converted.config, converted.state_dict)
    model.keep_heads(0, [2])
    model.keep_units(1, list(range(0, 40, 3)))
    model.remove_attention(2)
    compressed = Converted(model.config, model.state_dict(), converted.source_format, converted.extras)
    written = tmp_path / "pruned.pth"
    torch.save(to_s3prl_checkpoint(compressed), written)
    config = torch.load(written, weights_only=True)["config"]
    assert config["encoder_num_heads"] == [1, 3, 3] and config["encoder_head_dim"] == 16
    assert config["encoder_ff_interm_features"] == [40, 14, 40]
    assert config["encoder_use_attention"] == [True, True, False]
    theirs, _ = torchaudio_states(load_torchaudio_reference(written), padded_batch)
    ours, padding = our_states(compressed, padded_batch)
    assert_same_states(ours, theirs, padding)
    assert load_base(written).config == model.config


# -------------------------------------------------------------------------------- reading files
def test_loading_needs_no_allow_list_entry(tmp_path):
    """The file is plain tensors, lists, tuples and numbers: torch's weights-only loader reads it as it is."""
    path = make_torchaudio_checkpoint(tmp_path / "d.pth", pruned_post_ln(), extra={
        "distill_linear_projs": {"0.weight": torch.ones(2, 2)}})
    ckpt = torch.load(path, weights_only=True)  # no safe_globals at all
    assert detect_format(ckpt) == TORCHAUDIO_FORMAT
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = load_base(path)
    assert torch.equal(converted.extras["others"]["distill_linear_projs"]["0.weight"], torch.ones(2, 2))


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["config"].update(encoder_prune_attention_heads=True), "hard-concrete pruning gates"),
    (lambda c: c["config"].update(encoder_remaining_heads=[[0, 1, 2]] * 3), "WavLM"),
    (lambda c: c["config"].update(encoder_num_heads=[3, 2, 3]), r"layer 1: the config says 2 heads of 16"),
    (lambda c: c["config"].update(encoder_use_feed_forward=[True, True, False]), "layer 2: the config removes"),
    (lambda c: c["config"].update(encoder_ff_interm_features=[40, 40]), "2 entries for 3 layers"),
    (lambda c: c["state_dict"].update(extra_thing=torch.ones(1)), r"unexpected tensors \['extra_thing'\]"),
    (lambda c: c["config"].update(extractor_conv_layer_config=TINY_CONV[:-1] + [(21, 2, 2)]),
     "conv layer 6: extractor_conv_layer_config says 21 channels"),
])
def test_malformed_files_are_refused_naming_the_problem(tmp_path, edit, message):
    path = make_torchaudio_checkpoint(tmp_path / "d.pth", dphubert_config(stock_config()))
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=message):
        load_base(path)


def test_what_the_layout_cannot_hold_is_refused_when_writing(tmp_path, hubert_ckpt):
    converted = load_base(make_torchaudio_checkpoint(tmp_path / "s.pth"))
    model = SpeechTransformer.from_state_dict(converted.config, converted.state_dict)
    model.replace_linear(0, "fc1", factorize(model.linear(0, "fc1"), 4))
    with pytest.raises(ValueError, match="no low-rank Linears"):
        to_s3prl_checkpoint(Converted(model.config, model.state_dict(), TORCHAUDIO_FORMAT, converted.extras))
    with pytest.raises(ValueError, match="a hubert model has another hidden-state layout"):
        torchaudio_layout.write(load_base(hubert_ckpt))


# --------------------------------------------------------------------------------- upstreams
def test_dphubert_local_gives_dphubert_s_hidden_states_through_s3prl_hub(tmp_path, s3prl_hub, padded_batch):
    path = make_torchaudio_checkpoint(tmp_path / "d.pth", pruned_post_ln(), pos_conv="weight_norm",
                                      scale_features=True)
    upstream = s3prl_hub.dphubert_local(ckpt=str(path), model_config=None, refresh=False)
    with torch.no_grad():
        result = upstream([w.clone() for w in padded_batch])
    states = result["hidden_states"]
    assert len(states) == 4  # projected features + 3 layers, as DPHuBERT's extract_features
    assert all(state.shape == states[0].shape for state in states)
    assert upstream.get_downsample_rates("hidden_states") == 320
    assert abs(states[0].shape[1] - round(16000 / 320)) <= 5
    theirs, _ = torchaudio_states(load_torchaudio_reference(path), padded_batch)
    assert_same_states(list(states), theirs, ~result["pad_mask"])


def test_dphubert_local_refuses_another_format(tmp_path, s3prl_hub):
    hubert = make_hubert_checkpoint(tmp_path / "h.pt")
    with pytest.raises(DeltaError, match="not in torchaudio's wav2vec2 layout"):
        s3prl_hub.dphubert_local(ckpt=str(hubert), model_config=None, refresh=False)


# ------------------------------------------------------------------------------- compression
def per_layer_pruned() -> dict:
    """DPHuBERT's usual result (pruning units conv, head, interm): per-layer sizes, every sublayer kept."""
    return dphubert_config(stock_config(), heads=[3, 1, 2], ffn=[40, 13, 7], conv_layers=PRUNED_CONV)


TECHNIQUES = [
    ([{"method": "head_pruning", "ratio": 0.5}], "headpruned"),
    ([{"method": "row_pruning", "ratio": 0.5}], "rowpruned"),
    ([{"method": "low_rank", "ratio": 0.5}], "lowrank"),
    ([{"method": "weight_pruning", "sparsity": 0.7}], "weightpruned"),
    ([{"method": "distillation", "student_layers": 1, "pred_layers": [1, 3], "audio": "AUDIO", "steps": 2,
       "batch_size": 2, "max_seconds": 1.0, "device": "cpu"}], "kd"),
    ([{"method": "conv_pruning", "ratio": 0.25}], "convpruned"),  # the last conv layer too: the feature scale follows
    ([{"method": "joint_pruning", "target_params": 30000, "audio": "AUDIO", "steps": 2, "batch_size": 2,
       "max_seconds": 1.0, "device": "cpu", "final_distillation": {"audio": "AUDIO", "steps": 1, "batch_size": 2,
                                                                  "max_seconds": 1.0, "device": "cpu"}}], "jointpruned"),
]
COMPRESS_CASES = [pytest.param(steps, technique, structure, id=f"{technique}-{structure.__name__}")
                  for structure in (per_layer_pruned, pruned_post_ln) for steps, technique in TECHNIQUES]


@pytest.mark.parametrize("steps,technique,structure", COMPRESS_CASES)
def test_a_compress_recipe_on_a_torchaudio_base_gives_a_delta_that_loads_back(tmp_path, s3prl_hub, padded_batch,
                                                                              audio_dir, steps, technique, structure):
    def audio(options: dict) -> dict:
        return {k: str(audio_dir) if v == "AUDIO" else audio(v) if isinstance(v, dict) else v for k, v in options.items()}

    steps = [audio(step) for step in steps]
    base = make_torchaudio_checkpoint(tmp_path / "dphubert.pth", structure(), pos_conv="weight_norm",
                                      scale_features=True)
    delta = run_recipe(parse_recipe({"base": str(base), "steps": steps}), work_dir=tmp_path / "work")
    assert delta.technique == technique and delta.base_family == "dphubert"
    path = write_delta(delta, tmp_path / "d.safetensors")
    model, _ = load_compressed(path, base)
    upstream = getattr(s3prl_hub, f"dphubert_{technique}")(ckpt=str(path), model_config=None, refresh=False)
    with torch.no_grad():
        result = upstream([w.clone() for w in padded_batch])
    states = result["hidden_states"]
    assert len(states) == delta.config.num_hidden_states
    assert all(s.shape == states[0].shape and bool(torch.isfinite(s).all()) for s in states)
    with torch.no_grad():  # the named upstream runs exactly the model the delta describes
        expected, padding = model.eval()(pad_sequence(padded_batch, batch_first=True),
                                         torch.tensor([len(w) for w in padded_batch]))
    assert_same_states(list(states), expected, padding)
    if technique not in ("weightpruned", "kd"):  # a tiny base is smaller than a student with prediction heads
        assert delta.manifest["params"]["compressed"] < delta.manifest["params"]["base"]


def test_a_stock_torchaudio_file_is_a_base_for_the_compress_command(tmp_path, s3prl_hub, padded_batch):
    """``base: FILE`` in a recipe: torchaudio's own wav2vec2_model arguments, head pruning without recovery."""
    from upstream_compressed.cli import main as cli_main

    make_torchaudio_checkpoint(tmp_path / "wav2vec2.pth")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("base: wav2vec2.pth\nsteps:\n  - method: head_pruning\n    ratio: 0.34\n")
    out = tmp_path / "headpruned.safetensors"
    assert cli_main(["compress", str(recipe), "-o", str(out)]) == 0
    upstream = s3prl_hub.dphubert_headpruned(ckpt=str(out), model_config=None, refresh=False)
    assert [layer.num_heads for layer in upstream.model.config.layers] == [2, 2, 2]
    with torch.no_grad():
        states = upstream([w.clone() for w in padded_batch])["hidden_states"]
    assert len(states) == 4 and all(s.shape == states[0].shape for s in states)
