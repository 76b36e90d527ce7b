"""MelHuBERT as a base: its checkpoint layout loads, matches a reference computation, and compresses.

S3PRL 0.4.18 ships no MelHuBERT upstream, so parity is against an independent, straightforward
computation written here from the checkpoint's raw tensors: Kaldi fbank -> normalise -> stack two
frames -> project -> positional conv -> Transformer layers with explicit softmax attention.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.nn.utils.rnn import pad_sequence
from torchaudio.compliance.kaldi import fbank

from upstream_compressed.compress import run_recipe
from upstream_compressed.delta import DeltaError, apply_delta, load_compressed, write_delta
from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import CheckpointError, load_base, to_s3prl_checkpoint
from upstream_compressed.recipe import parse_recipe
from upstream_compressed.testing.checkpoints import make_melhubert_checkpoint

from helpers import max_valid_difference, run_model


# ------------------------------------------------------------------------------- the reference
def reference_states(ckpt_path, wavs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """MelHuBERT's upstream computation, written out plainly from the checkpoint file."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    cfg, sd = ckpt["Upstream_Config"]["melhubert"], dict(ckpt["model"])
    for key in [k for k in sd if k.endswith("_orig")]:  # weight-pruned: weight = orig * mask
        sd[key[:-5]] = sd.pop(key) * sd.pop(key[:-5] + "_mask")
    mean, std = (torch.from_numpy(row).float() for row in np.load(ckpt_path.parent / f"{ckpt_path.stem}.mean-std.npy"))
    feats = []
    for wav in wavs:
        y = fbank(wav[None] * 32768, num_mel_bins=40, sample_frequency=16000, frame_length=25, frame_shift=10,
                  window_type="hamming")
        y = (y - mean) / std
        if cfg["feat_emb_dim"] == 80:  # frames 0,2,4,... beside frames 1,3,5,... (zeros if odd)
            first, second = y[::2], y[1::2]
            if len(second) < len(first):
                second = torch.cat([second, torch.zeros(1, 40)])
            y = torch.cat([first, second], dim=1)
        feats.append(y)
    lengths = torch.tensor([len(f) for f in feats])
    pad = torch.arange(max(lengths))[None, :] >= lengths[:, None]
    x = F.linear(pad_sequence(feats, batch_first=True), sd["pre_extract_proj.weight"], sd["pre_extract_proj.bias"])
    states = [x]
    x = x.masked_fill(pad[..., None], 0.0)
    g, v = sd["encoder.pos_conv.0.weight_g"], sd["encoder.pos_conv.0.weight_v"]
    kernel = v.shape[-1]
    conv = F.conv1d(x.transpose(1, 2), v * g / v.norm(dim=(0, 1), keepdim=True), sd["encoder.pos_conv.0.bias"],
                    padding=kernel // 2, groups=cfg["conv_pos_groups"])
    if kernel % 2 == 0:
        conv = conv[..., :-1]
    x = x + F.gelu(conv).transpose(1, 2)
    dim = cfg["encoder_embed_dim"]
    head_dim = dim // cfg["encoder_attention_heads"]
    norm = lambda t, name: F.layer_norm(t, (dim,), sd[f"{name}.weight"], sd[f"{name}.bias"])  # noqa: E731
    lin = lambda t, name: F.linear(t, sd[f"{name}.weight"], sd[f"{name}.bias"])  # noqa: E731
    if not cfg["layer_norm_first"]:
        x = norm(x, "encoder.layer_norm")
    for i in range(cfg["encoder_layers"]):
        p = f"encoder.layers.{i}"

        def attention(h):
            q, k, val = (lin(h, f"{p}.self_attn.{n}_proj") for n in "qkv")
            split = lambda t: t.unflatten(-1, (-1, head_dim)).transpose(1, 2)  # noqa: E731
            scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(head_dim)
            probs = scores.masked_fill(pad[:, None, None, :], float("-inf")).softmax(-1)
            return lin((probs @ split(val)).transpose(1, 2).flatten(2), f"{p}.self_attn.out_proj")

        ffn = lambda h: lin(F.gelu(lin(h, f"{p}.fc1")), f"{p}.fc2")  # noqa: E731
        if cfg["layer_norm_first"]:
            x = x + attention(norm(x, f"{p}.self_attn_layer_norm"))
            x = x + ffn(norm(x, f"{p}.final_layer_norm"))
        else:
            x = norm(x + attention(x), f"{p}.self_attn_layer_norm")
            x = norm(x + ffn(x), f"{p}.final_layer_norm")
        states.append(x)
    return states, pad


@pytest.fixture(scope="module")
def melhubert_ckpt(tmp_path_factory):
    return make_melhubert_checkpoint(tmp_path_factory.mktemp("melhubert") / "tiny_melhubert.ckpt")


VARIANTS = {
    "20ms": {},
    "10ms-pre-ln": {"frame_period": 10, "layer_norm_first": True},
    "head-and-weight-pruned": {"pruned_heads": {0: [1, 3], 1: [0]}, "weight_pruned": 0.5},
}


# ---------------------------------------------------------------------------------- the loader
@pytest.mark.parametrize("variant", VARIANTS)
def test_hidden_states_match_the_reference(tmp_path, padded_batch, variant):
    ckpt = make_melhubert_checkpoint(tmp_path / "m.ckpt", **VARIANTS[variant])
    base = load_base(ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    ours, padding = run_model(model, padded_batch)
    expected, reference_padding = reference_states(ckpt, padded_batch)
    assert torch.equal(padding, reference_padding)
    assert len(ours) == len(expected) == base.config.num_layers + 1
    for a, b in zip(ours, expected):
        assert max_valid_difference(a, b, padding) < 1e-5
    stack = 2 if VARIANTS[variant].get("frame_period", 20) == 20 else 1
    assert base.config.downsample_rate == 160 * stack
    fbank_frames = 1 + (16000 - 400) // 160
    assert ours[0].shape[1] == math.ceil(fbank_frames / stack)


def test_pruned_layouts_give_the_pruned_structure(tmp_path):
    ckpt = make_melhubert_checkpoint(tmp_path / "m.ckpt", pruned_heads={0: [1, 3], 1: [0]}, weight_pruned=0.5)
    base = load_base(ckpt)
    assert [layer.num_heads for layer in base.config.layers] == [2, 3]
    fc1 = base.state_dict["layers.0.feed_forward.fc1.weight"]
    assert 0.4 < (fc1 == 0).float().mean() < 0.6  # the masks are folded into the weights


def test_a_batch_gives_each_utterance_what_it_gives_alone(melhubert_ckpt, padded_batch):
    base = load_base(melhubert_ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    batched, padding = run_model(model, padded_batch)
    for i, wav in enumerate(padded_batch):
        alone, _ = run_model(model, [wav])
        frames = int((~padding[i]).sum())
        assert alone[-1].shape[1] == frames
        assert (batched[-1][i, :frames] - alone[-1][0]).abs().max() < 1e-5


def test_round_trip_back_to_the_melhubert_layout(tmp_path, melhubert_ckpt):
    base = load_base(melhubert_ckpt)
    written = tmp_path / "again.ckpt"
    torch.save(to_s3prl_checkpoint(base), written)
    again = load_base(written, mean_std=melhubert_ckpt.parent / f"{melhubert_ckpt.stem}.mean-std.npy")
    assert again.config == base.config
    assert again.state_dict.keys() == base.state_dict.keys()
    assert all(torch.equal(again.state_dict[k], base.state_dict[k]) for k in base.state_dict)


def test_missing_or_bad_statistics_are_refused_clearly(tmp_path):
    ckpt = make_melhubert_checkpoint(tmp_path / "m.ckpt")
    stats = tmp_path / "m.mean-std.npy"
    stats.rename(tmp_path / "elsewhere.npy")
    with pytest.raises(CheckpointError, match="needs its fbank mean/std file"):
        load_base(ckpt)
    np.save(tmp_path / "bad.npy", np.ones((3, 40), dtype=np.float32))
    with pytest.raises(CheckpointError, match=r"expected 2 rows \(mean, std\) of 40"):
        load_base(ckpt, mean_std=tmp_path / "bad.npy")
    assert load_base(ckpt, mean_std=tmp_path / "elsewhere.npy").config.fbank_stack == 2


# ------------------------------------------------------------------------- compression, upstreams
def _compress(tmp_path, ckpt, steps, **recipe_extra):
    recipe = parse_recipe({"base": str(ckpt), "steps": steps, **recipe_extra})
    return run_recipe(recipe, work_dir=tmp_path / "work")


@pytest.mark.parametrize("steps,technique", [
    ([{"method": "head_pruning", "ratio": 0.5}], "headpruned"),
    ([{"method": "row_pruning", "ratio": 0.5, "criterion": "data_driven", "audio": "AUDIO"}], "rowpruned"),
    ([{"method": "low_rank", "ratio": 0.5}], "lowrank"),
    ([{"method": "weight_pruning", "sparsity": 0.7}], "weightpruned"),
    ([{"method": "distillation", "student_layers": 1, "pred_layers": [1, 2], "audio": "AUDIO", "steps": 2,
       "batch_size": 2, "max_seconds": 1.0, "device": "cpu"}], "kd"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_every_technique_compresses_a_melhubert_into_its_upstream(tmp_path, s3prl_hub, melhubert_ckpt, audio_dir,
                                                                  padded_batch, steps, technique):
    steps = [{k: (str(audio_dir) if v == "AUDIO" else v) for k, v in step.items()} for step in steps]
    delta = _compress(tmp_path, melhubert_ckpt, steps)
    assert delta.technique == technique and delta.base_family == "melhubert"
    assert delta.manifest["base"]["mean_std"]["file_name"] == f"{melhubert_ckpt.stem}.mean-std.npy"
    assert not any(name.startswith("feature_extractor.") for name in delta.tensors)  # the statistics stay in the base
    path = write_delta(delta, tmp_path / "d.safetensors")
    upstream = getattr(s3prl_hub, f"melhubert_{technique}")(ckpt=str(path), model_config=None, refresh=False)
    with torch.no_grad():
        result = upstream(padded_batch)
    states = result["hidden_states"]
    assert len(states) == delta.config.num_hidden_states
    assert all(s.shape == states[0].shape and bool(torch.isfinite(s).all()) for s in states)
    assert upstream.get_downsample_rates("hidden_states") == 320
    assert abs(states[0].shape[1] - round(16000 / 320)) <= 5
    if technique != "weightpruned":
        assert delta.manifest["params"]["compressed"] < delta.manifest["params"]["base"]


def test_melhubert_local_equals_the_identity_delta(tmp_path, s3prl_hub, melhubert_ckpt, padded_batch):
    path = write_delta(_compress(tmp_path, melhubert_ckpt, []), tmp_path / "identity.safetensors")
    ours = s3prl_hub.melhubert_identity(ckpt=str(path), model_config=None, refresh=False)
    local = s3prl_hub.melhubert_local(ckpt=str(melhubert_ckpt), model_config=None, refresh=False)
    expected, _ = reference_states(melhubert_ckpt, padded_batch)
    with torch.no_grad():
        a, b = ours(padded_batch), local(padded_batch)
    padding = ~a["pad_mask"]
    for x, y, z in zip(a["hidden_states"], b["hidden_states"], expected):
        assert torch.equal(x, y)
        assert max_valid_difference(x, z, padding) < 1e-5


def test_statistics_file_is_found_named_and_verified(tmp_path, s3prl_hub, melhubert_ckpt, hubert_ckpt):
    # a recipe may name the statistics file; loading finds it by its recorded path, or -g mean_std
    stats = tmp_path / "stats" / "libri-mean-std.npy"
    stats.parent.mkdir()
    stats.write_bytes((melhubert_ckpt.parent / f"{melhubert_ckpt.stem}.mean-std.npy").read_bytes())
    base_copy = tmp_path / "base" / "copy.ckpt"
    base_copy.parent.mkdir()
    base_copy.write_bytes(melhubert_ckpt.read_bytes())
    delta = _compress(tmp_path, base_copy, [{"method": "head_pruning", "ratio": 0.5}], mean_std=str(stats))
    path = write_delta(delta, tmp_path / "d.safetensors")
    model, _ = load_compressed(path, base_copy)
    assert model.config.layers[0].num_heads == 2

    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.stack([np.zeros(40), np.ones(40)]).astype(np.float32))
    options = tmp_path / "options.yaml"
    options.write_text(yaml.safe_dump({"mean_std": str(wrong)}))
    with pytest.raises(DeltaError, match="wrong statistics file"):
        s3prl_hub.melhubert_headpruned(ckpt=str(path), model_config=str(options), refresh=False)
    stats.unlink()
    with pytest.raises(DeltaError, match="cannot find the fbank mean/std file"):
        load_compressed(path, base_copy)

    # a HuBERT delta is not a MelHuBERT one
    hubert_delta = write_delta(_compress(tmp_path, hubert_ckpt, [{"method": "head_pruning", "ratio": 0.5}]),
                               tmp_path / "h.safetensors")
    with pytest.raises(DeltaError, match="compresses a hubert base"):
        s3prl_hub.melhubert_headpruned(ckpt=str(hubert_delta), model_config=None, refresh=False)
    with pytest.raises(DeltaError, match="not MelHuBERT"):
        s3prl_hub.melhubert_local(ckpt=str(hubert_ckpt), model_config=None, refresh=False)


def test_fbank_front_end_refuses_audio_shorter_than_one_window(melhubert_ckpt, s3prl_hub):
    upstream = s3prl_hub.melhubert_local(ckpt=str(melhubert_ckpt), model_config=None, refresh=False)
    with pytest.raises(ValueError, match="needs at least 400"):
        upstream([torch.randn(16000), torch.randn(300)])


def test_apply_delta_keeps_the_base_statistics(tmp_path, melhubert_ckpt):
    delta = _compress(tmp_path, melhubert_ckpt, [{"method": "row_pruning", "ratio": 0.25}])
    model = apply_delta(delta, load_base(melhubert_ckpt))
    base = load_base(melhubert_ckpt)
    assert torch.equal(model.feature_extractor.mean, base.state_dict["feature_extractor.mean"])
    assert model.num_parameters() == delta.manifest["params"]["compressed"]
