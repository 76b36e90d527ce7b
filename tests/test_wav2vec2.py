"""wav2vec 2.0 as a base: S3PRL's converted layout read and written, parity with its own ``wav2vec2_local``."""

from __future__ import annotations

import pytest
import torch

from upstream_compressed.bases import KNOWN_BASES
from upstream_compressed.model import ModelConfig, SpeechTransformer
from upstream_compressed.model.convert import Converted, load_base, to_s3prl_checkpoint
from upstream_compressed.model.formats import detect, wav2vec2
from upstream_compressed.model.layers import factorize
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint
from upstream_compressed.testing.wav2vec2_checkpoints import make_wav2vec2_checkpoint, wav2vec2_reference

from helpers import max_valid_difference, run_model

TOLERANCE = 1e-5
BASE: dict = {}  # wav2vec 2.0 Base: post-LN, GroupNorm front end, no conv bias, raw waveform
LARGE = {"layer_norm_first": True, "normalize": True, "extractor_mode": "layer_norm", "conv_bias": True, "layers": 3}


@pytest.fixture
def batch() -> list[torch.Tensor]:
    """Four lengths; at 5003 and 7361 samples HuBERT's chunk rule would count one more valid frame."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=generator) for n in (16000, 11000, 5003, 7361)]


def s3prl_states(ckpt, wavs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(wav2vec2_reference(ckpt)([w.clone() for w in wavs])["hidden_states"])


def our_model(converted: Converted) -> SpeechTransformer:
    model = SpeechTransformer(converted.config)
    model.load_state_dict(converted.state_dict)
    return model.eval()


def assert_same_states(ours: list[torch.Tensor], theirs: list[torch.Tensor], padding_mask: torch.Tensor) -> None:
    assert len(ours) == len(theirs)
    assert padding_mask.any(), "the batch must contain padding for this test to mean anything"
    for layer, (a, b) in enumerate(zip(ours, theirs)):
        assert max_valid_difference(a, b, padding_mask) < TOLERANCE, f"hidden state {layer}"


@pytest.mark.parametrize("options", [BASE, LARGE], ids=["base", "large"])
def test_hidden_states_match_s3prl(tmp_path, s3prl_hub, batch, options):
    ckpt = make_wav2vec2_checkpoint(tmp_path / "w2v.pt", **options)
    converted = load_base(ckpt)
    assert converted.source_format == wav2vec2.NAME
    states, padding_mask = run_model(our_model(converted), batch)
    assert len(states) == converted.config.num_hidden_states == converted.config.num_layers + 1
    assert_same_states(states, s3prl_states(ckpt, batch), padding_mask)


def test_padding_follows_the_conv_lengths_not_hubert_chunks(tmp_path, batch):
    """The batch above separates the two rules, so the parity test checks wav2vec 2.0's own."""
    config = load_base(make_wav2vec2_checkpoint(tmp_path / "w2v.pt")).config
    assert ModelConfig.from_dict(config.to_dict()) == config  # manifests keep the rule
    lengths = torch.tensor([len(w) for w in batch])
    frames = int((~SpeechTransformer(config).frame_padding_mask(lengths, 16000, 49)).sum())
    config.conv_length_padding = False
    hubert_frames = int((~SpeechTransformer(config).frame_padding_mask(lengths, 16000, 49)).sum())
    assert hubert_frames > frames


def test_pretraining_tensors_are_kept_aside(tmp_path):
    converted = load_base(make_wav2vec2_checkpoint(tmp_path / "w2v.pt"))
    aside = converted.extras["pretraining_weights"]
    expected = {"quantizer.vars", "quantizer.weight_proj.weight", "project_q.weight", "final_proj.weight", "mask_emb"}
    assert expected <= set(aside)
    assert not any(key.startswith(("quantizer", "project_q", "final_proj", "mask_emb")) for key in converted.state_dict)


@pytest.mark.parametrize("options", [BASE, LARGE], ids=["base", "large"])
def test_round_trip_back_to_s3prl_format(tmp_path, s3prl_hub, batch, options):
    ckpt = make_wav2vec2_checkpoint(tmp_path / "w2v.pt", **options)
    converted = load_base(ckpt)
    written = tmp_path / "written.pt"
    torch.save(to_s3prl_checkpoint(converted), written)

    again = load_base(written)
    assert again.source_format == wav2vec2.NAME and again.config == converted.config
    assert again.state_dict.keys() == converted.state_dict.keys()
    assert all(torch.equal(again.state_dict[k], v) for k, v in converted.state_dict.items())
    original = torch.load(ckpt, weights_only=True)
    rewritten = torch.load(written, weights_only=True)
    assert rewritten.keys() == original.keys()
    assert rewritten["model_weight"].keys() == original["model_weight"].keys()
    before, after = s3prl_states(ckpt, batch), s3prl_states(written, batch)
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-6)


def test_uniformly_head_pruned_model_runs_in_s3prl(tmp_path, s3prl_hub, batch):
    """S3PRL's attention is always embed_dim wide: the pruned heads go back as zero heads, which add nothing."""
    base = load_base(make_wav2vec2_checkpoint(tmp_path / "w2v.pt", layers=3))
    model = our_model(base)
    for layer in range(model.config.num_layers):
        model.keep_heads(layer, [2, 0])
    written = tmp_path / "pruned.pt"
    torch.save(to_s3prl_checkpoint(Converted(model.config, model.state_dict(), base.source_format, base.extras)),
               written)

    saved = torch.load(written, weights_only=True)
    assert saved["model_cfg"]["encoder_attention_heads"] == 3
    assert not saved["model_weight"]["encoder.layers.1.self_attn.out_proj.weight"][:, 32:].any()
    ours, padding_mask = run_model(model, batch)
    assert_same_states(ours, s3prl_states(written, batch), padding_mask)


def test_uniformly_row_pruned_model_runs_in_s3prl(tmp_path, s3prl_hub, batch):
    """The written config follows the structure (FFN width), not the base's config kept in extras."""
    base = load_base(make_wav2vec2_checkpoint(tmp_path / "w2v.pt", **LARGE))
    model = our_model(base)
    for layer in range(model.config.num_layers):
        model.keep_units(layer, range(3, 30, 2))
    written = tmp_path / "pruned.pt"
    torch.save(to_s3prl_checkpoint(Converted(model.config, model.state_dict(), base.source_format, base.extras)),
               written)
    assert torch.load(written, weights_only=True)["model_cfg"]["encoder_ffn_embed_dim"] == 14
    ours, padding_mask = run_model(model, batch)
    assert_same_states(ours, s3prl_states(written, batch), padding_mask)


def test_written_options_follow_the_config_not_stale_extras(tmp_path):
    base = load_base(make_wav2vec2_checkpoint(tmp_path / "w2v.pt", **LARGE))
    stale = {**base.extras, "task_cfg": {**base.extras["task_cfg"], "normalize": False},
             "model_cfg": {**base.extras["model_cfg"], "conv_bias": False, "layer_norm_first": False,
                           "extractor_mode": "default", "encoder_layers": 1}}
    written = wav2vec2.write(Converted(base.config, base.state_dict, base.source_format, stale))
    assert written["task_cfg"]["normalize"] is True
    assert wav2vec2.read(written).config == base.config


def test_hubert_files_are_still_hubert(tmp_path):
    hubert_ckpt = make_hubert_checkpoint(tmp_path / "hubert.pt")
    hubert = load_base(hubert_ckpt)
    assert hubert.source_format == "s3prl_hubert"
    assert "conv_length_padding" not in hubert.config.to_dict()  # HuBERT manifests are unchanged
    ckpt = torch.load(hubert_ckpt, weights_only=True)
    assert not wav2vec2.matches(ckpt)
    assert not wav2vec2.matches({**ckpt, "model_cfg": {**ckpt["model_cfg"], "_name": "hubert"}})


def test_wav2vec2_detected_by_name_or_by_its_tensors(tmp_path):
    ckpt = torch.load(make_wav2vec2_checkpoint(tmp_path / "w2v.pt"), weights_only=True)
    assert detect(ckpt) is wav2vec2
    unnamed = {**ckpt, "model_cfg": {k: v for k, v in ckpt["model_cfg"].items() if k != "_name"}}
    assert detect(unnamed) is wav2vec2
    no_project_q = {k: v for k, v in unnamed["model_weight"].items() if not k.startswith("project_q")}
    assert not wav2vec2.matches({**unnamed, "model_weight": no_project_q})


def test_unknown_tensors_and_options_are_refused(tmp_path):
    ckpt = torch.load(make_wav2vec2_checkpoint(tmp_path / "w2v.pt"), weights_only=True)
    with pytest.raises(ValueError, match="unexpected wav2vec 2.0 tensors"):
        wav2vec2.read({**ckpt, "model_weight": {**ckpt["model_weight"], "encoder.extra.weight": torch.zeros(1)}})
    for option, value in (("layer_type", "conformer"), ("quantize_input", True), ("pos_conv_depth", 5)):
        with pytest.raises(ValueError):
            wav2vec2.read({**ckpt, "model_cfg": {**ckpt["model_cfg"], option: value}})


def _pruned(base: Converted, change) -> Converted:
    model = our_model(base)
    change(model)
    return Converted(model.config, model.state_dict(), base.source_format, base.extras)


@pytest.mark.parametrize("change,message", [
    (lambda m: m.keep_units(0, range(20)), "differs per layer"),
    (lambda m: [m.replace_linear(i, "fc1", factorize(m.linear(i, "fc1"), 4)) for i in range(2)], "low-rank"),
    (lambda m: m.remove_attention(1), "removed attention or FFN sublayer"),
    (lambda m: m.keep_channels(6, range(21)), "quantizer"),
], ids=["non-uniform-ffn", "low-rank", "removed-sublayer", "conv-pruned"])
def test_write_refuses_what_s3prl_cannot_express(tmp_path, change, message):
    base = load_base(make_wav2vec2_checkpoint(tmp_path / "w2v.pt"))
    with pytest.raises(ValueError, match=message):
        to_s3prl_checkpoint(_pruned(base, change))


def test_write_refuses_other_models(tmp_path):
    hubert = load_base(make_hubert_checkpoint(tmp_path / "hubert.pt"))
    with pytest.raises(ValueError, match="only a wav2vec 2.0 model"):
        wav2vec2.write(hubert)


def test_known_base_is_s3prls_own_download(monkeypatch, s3prl_hub):
    from s3prl.upstream.wav2vec2 import hubconf

    asked = {}
    monkeypatch.setattr(hubconf, "wav2vec2_custom", lambda **kwargs: asked.update(kwargs))
    hubconf.wav2vec2_base_960()
    assert KNOWN_BASES["wav2vec2"] == asked["ckpt"]
