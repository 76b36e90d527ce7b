"""The SUPERB leaderboard's MAC protocol reproduces the published HuBERT Base numbers exactly.

Published for HuBERT Base (the leaderboard, profiled with its DeepSpeed profiler fork):
all 1,669,156,022,848 MACs; buckets 149,255,103,040 / 261,280,279,552 / 422,366,359,296 /
836,254,280,960; params 94,697,600.

WavLM (S3PRL's ``wavlm_local`` and our upstream agree): its attention is HuBERT's plus the gate's Linear
(8 outputs from each head's chunk of the block input, every frame); the relative position bias is a lookup
and its gating element-wise, and the fork's MHA formula charges the mask add whether or not a mask is given.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_end_to_end import make_delta
from test_profile import analytic_macs
from upstream_compressed.cli import main
from upstream_compressed.expert import UpstreamExpert
from upstream_compressed.model import HUBERT, LayerConfig, ModelConfig, SpeechTransformer
from upstream_compressed.model.convert import load_base
from upstream_compressed.model.layers import GATE_OUTPUTS, factorize
from upstream_compressed.superb.macs import LeaderboardMacCounter
from upstream_compressed.superb.protocol import FORM_FIELDS, LENGTHS, superb_profile, utterance_macs
from upstream_compressed.testing.checkpoints import HUBERT_BASE, HUBERT_BASE_CONV_LAYERS, make_hubert_checkpoint
from upstream_compressed.testing.wavlm_checkpoints import make_wavlm_checkpoint
from upstream_compressed.upstream_profile import load_upstream

PUBLISHED_HUBERT_BASE = {
    "macs": 1_669_156_022_848,
    "macsShort": 149_255_103_040,
    "macsMedium": 261_280_279_552,
    "macsLong": 422_366_359_296,
    "macsLonger": 836_254_280_960,
    "paramShared": 94_697_600,
}
PRETRAINING_ONLY = ("mask_emb", "label_embs_concat", "final_proj.weight", "final_proj.bias")
# WavLM Base+'s shape: HuBERT Base's, plus the gated relative position bias (320 buckets up to 800 frames).
WAVLM_BASE_PLUS = dict(layers=12, dim=768, ffn=3072, heads=12, conv_layers=HUBERT_BASE_CONV_LAYERS, conv_pos=128,
                       conv_pos_groups=16, num_buckets=320, max_distance=800, gru_rel_pos=True)


def counted(fn) -> int:
    counter = LeaderboardMacCounter()
    with torch.no_grad(), counter:
        fn()
    return counter.macs


def test_each_rule_is_the_forks_formula():
    x = torch.randn(2, 5, 8)
    w = torch.randn(6, 8)
    assert counted(lambda: F.linear(x, w, torch.zeros(6))) == x.numel() * 6
    wav, kernel = torch.randn(1, 16, 50), torch.randn(16, 4, 9)  # 4 groups, padding 4: 50 output positions
    assert counted(lambda: F.conv1d(wav, kernel, padding=4, groups=4)) == 50 * 16 * (16 // 4) * 9
    a, b = torch.randn(3, 4, 5), torch.randn(3, 5, 7)
    assert counted(lambda: torch.bmm(a, b)) == counted(lambda: a @ b) == a.numel() * 7
    assert counted(lambda: torch.addmm(torch.zeros(4, 7), a[0], b[0])) == 20 * 7
    assert counted(lambda: torch.einsum("bij,bjk->bik", a, b)) == 3 * 4 * 5 * 7
    assert counted(lambda: (F.gelu(x) + x * 2).softmax(-1)) == 0  # element-wise, activation, softmax: none


def test_attention_counts_by_the_forks_mha_formula_and_only_once():
    mha = torch.nn.MultiheadAttention(16, 4, dropout=0.1).eval()
    q = torch.randn(7, 1, 16)  # (T, B, E)
    macs = counted(lambda: mha(q, q, q, need_weights=False))
    t, e, h = 7, 16, 4
    projections, matmuls = 4 * t * e * e, 2 * h * t * t * (e // h)
    fork_extras = 3 * t * e + t * e + h * t * t + 2 * h * t * t + h * t * t  # biases, scaling, mask, softmax, dropout
    assert macs == projections + matmuls + fork_extras  # the inner F.linear calls are not counted again


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A random HuBERT Base (504 targets, final_dim 256), encoder not padded to an even length, as in 2022."""
    return make_hubert_checkpoint(tmp_path_factory.mktemp("base") / "hubert_base.pt", required_seq_len_multiple=1,
                                  **HUBERT_BASE)


def test_s3prl_hubert_reproduces_the_published_numbers(base_checkpoint):
    values = superb_profile(load_upstream("hubert_local", str(base_checkpoint)))
    assert values == PUBLISHED_HUBERT_BASE


def test_our_upstream_reproduces_the_published_macs(base_checkpoint):
    base = load_base(base_checkpoint)
    values = superb_profile(UpstreamExpert(SpeechTransformer.from_state_dict(base.config, base.state_dict)))
    assert {k: values[k] for k in FORM_FIELDS[:-1]} == {k: PUBLISHED_HUBERT_BASE[k] for k in FORM_FIELDS[:-1]}
    # Our upstream does not hold the tensors only pre-training uses; S3PRL's HuBERT does.
    dropped = sum(base.extras["pretraining_weights"][name].numel() for name in PRETRAINING_ONLY)
    assert values["paramShared"] == PUBLISHED_HUBERT_BASE["paramShared"] - dropped


def test_s3prl_0418_pads_odd_frame_counts_by_one(base_checkpoint):
    """Today's S3PRL pads the encoder input to an even number of frames (2022's did not): one frame more."""
    upstream = load_upstream("hubert_local", str(base_checkpoint))
    upstream.model.encoder.required_seq_len_multiple = 2  # S3PRL 0.4.18's default
    even, odd = LENGTHS[0], LENGTHS[1]  # 64 and 107 frames
    padded = utterance_macs(upstream, (even, odd))
    upstream.model.encoder.required_seq_len_multiple = 1
    unpadded = utterance_macs(upstream, (even, odd))
    e, f, h = 768, 3072, 12
    per_layer = lambda t: t * (4 * e * e + 2 * e * f + 4 * e) + t * t * (2 * e + 4 * h)  # noqa: E731
    assert padded[0] == unpadded[0]
    assert padded[1] - unpadded[1] == 12 * (per_layer(108) - per_layer(107))


def frame_count(config: ModelConfig, samples: int) -> int:
    """Frames the conv front end makes of ``samples`` (no padding, so each conv drops its tail)."""
    for _, kernel, stride in config.conv_layers:
        samples = (samples - kernel) // stride + 1
    return samples


def protocol_macs(config: ModelConfig, samples: int) -> int:
    """The analytic count plus what the fork's MHA formula adds (bias adds, scaling, mask, softmax x 2,
    dropout) and, for WavLM, the gate's Linear on each kept head's chunk of the block input."""
    frames = frame_count(config, samples)
    extras = 0
    for layer in config.layers:
        inner = layer.num_heads * config.head_dim
        if layer.num_heads:
            extras += 4 * frames * inner + (4 if config.attention_dropout else 3) * layer.num_heads * frames * frames
            if config.gated_relative_position:
                extras += frames * inner * GATE_OUTPUTS
    return analytic_macs(config, samples) + extras


@pytest.mark.parametrize("attention_dropout", [0.1, 0.0])
def test_pruned_and_low_rank_structure_matches_the_formula(attention_dropout):
    model = SpeechTransformer(ModelConfig(
        kind=HUBERT, embed_dim=96, head_dim=16, layers=[LayerConfig(6, 384) for _ in range(3)],
        conv_layers=[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2, conv_pos=16, conv_pos_groups=4,
        attention_dropout=attention_dropout,
    ))
    model.keep_heads(0, [1, 4])
    model.keep_heads(2, [])
    model.keep_units(1, list(range(100)))
    model.replace_linear(1, "fc1", factorize(model.linear(1, "fc1"), 7))
    model.replace_linear(0, "q_proj", factorize(model.linear(0, "q_proj"), 5))
    lengths = LENGTHS[:3]
    expected = [protocol_macs(model.config, n) for n in lengths]
    assert utterance_macs(UpstreamExpert(model), lengths) == expected
    assert utterance_macs(UpstreamExpert(model), lengths, compute=True) == expected  # skipping arithmetic: same


def test_profile_cli_prints_the_form_fields(tmp_path, capsys):
    """S3PRL's tiny HuBERT through the CLI: every field equals the count by hand (formula per utterance,
    buckets of 8 consecutive lengths, all 32 summed; parameters of the checkpoint's tensors)."""
    ckpt = make_hubert_checkpoint(tmp_path / "tiny.pt", required_seq_len_multiple=1)  # no even-length padding
    assert main(["profile", "-u", "hubert_local", "-k", str(ckpt), "--protocol", "superb", "--json"]) == 0
    values = json.loads(capsys.readouterr().out)
    assert list(values) == list(FORM_FIELDS)
    per_utterance = [protocol_macs(load_base(ckpt).config, n) for n in LENGTHS]
    buckets = [sum(per_utterance[i:i + 8]) for i in range(0, 32, 8)]
    weights = torch.load(ckpt, weights_only=True)["model_weight"]
    assert values == {"macs": sum(per_utterance), **dict(zip(FORM_FIELDS[1:5], buckets)),
                      "paramShared": sum(t.numel() for t in weights.values())}
    assert np.all(np.diff(buckets) > 0)  # longer buckets, more MACs


def test_s3prl_distiller_and_ours_give_the_same_form(distiller_ckpt):
    """DistilHuBERT (prediction heads included) through S3PRL's distiller_local and through our upstream."""
    base = load_base(distiller_ckpt)
    ours = superb_profile(UpstreamExpert(SpeechTransformer.from_state_dict(base.config, base.state_dict)))
    assert superb_profile(load_upstream("distiller_local", str(distiller_ckpt))) == ours


def test_tiny_wavlm_s3prl_ours_and_the_formula_agree(tmp_path):
    """A tiny WavLM with the relative position bias and gate (attention dropout 0.1): S3PRL's wavlm_local, our
    model, and the formula per utterance; then pruned heads (original ids 2, 0; none in layer 1) by the formula."""
    ckpt = make_wavlm_checkpoint(tmp_path / "tiny_wavlm.pt")
    base = load_base(ckpt)
    assert base.config.gated_relative_position and base.config.relative_position_buckets
    lengths = (*LENGTHS[:2], LENGTHS[-1])
    expected = [protocol_macs(base.config, n) for n in lengths]
    assert utterance_macs(load_upstream("wavlm_local", str(ckpt)), lengths) == expected
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    assert utterance_macs(UpstreamExpert(model), lengths) == expected
    model.keep_heads(0, [2, 0])
    model.keep_heads(1, [])
    pruned = [protocol_macs(model.config, n) for n in lengths]
    assert utterance_macs(UpstreamExpert(model), lengths) == pruned
    assert utterance_macs(UpstreamExpert(model), lengths, compute=True) == pruned  # skipping arithmetic: same


@pytest.fixture(scope="module")
def wavlm_base_plus(tmp_path_factory):
    """A random WavLM Base+-shaped checkpoint and its identity delta, made by the real CLI."""
    ckpt = make_wavlm_checkpoint(tmp_path_factory.mktemp("wavlm") / "wavlm_base_plus.pt", **WAVLM_BASE_PLUS)
    return ckpt, make_delta(ckpt, [])


def test_wavlm_base_plus_s3prl_and_our_identity_delta_give_the_same_macs(wavlm_base_plus):
    """wavlm_local and wavlm_identity agree on every MAC field; both are HuBERT Base's published numbers plus the
    gate (12 layers x 8 outputs x 768 inputs per frame). Our upstream drops WavLM's mask_emb (pre-training only)."""
    ckpt, delta = wavlm_base_plus
    s3prl = superb_profile(load_upstream("wavlm_local", str(ckpt)))
    ours = superb_profile(load_upstream("wavlm_identity", str(delta)))
    assert {k: ours[k] for k in FORM_FIELDS[:-1]} == {k: s3prl[k] for k in FORM_FIELDS[:-1]}
    gate = [12 * GATE_OUTPUTS * 768 * ((n - 400) // 320 + 1) for n in LENGTHS]
    expected = {"macs": PUBLISHED_HUBERT_BASE["macs"] + sum(gate)}
    for i, name in enumerate(FORM_FIELDS[1:5]):
        expected[name] = PUBLISHED_HUBERT_BASE[name] + sum(gate[8 * i: 8 * i + 8])
    assert {k: ours[k] for k in FORM_FIELDS[:-1]} == expected
    assert s3prl["paramShared"] - ours["paramShared"] == WAVLM_BASE_PLUS["dim"]  # mask_emb
