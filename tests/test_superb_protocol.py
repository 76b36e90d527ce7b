"""The SUPERB leaderboard's MAC protocol reproduces the published HuBERT Base numbers exactly.

Published for HuBERT Base (the leaderboard, profiled with its DeepSpeed profiler fork):
all 1,669,156,022,848 MACs; buckets 149,255,103,040 / 261,280,279,552 / 422,366,359,296 /
836,254,280,960; params 94,697,600.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_profile import analytic_macs
from upstream_compressed.cli import main
from upstream_compressed.expert import UpstreamExpert
from upstream_compressed.model import HUBERT, LayerConfig, ModelConfig, SpeechTransformer
from upstream_compressed.model.convert import load_base
from upstream_compressed.model.layers import factorize
from upstream_compressed.superb.macs import LeaderboardMacCounter
from upstream_compressed.superb.protocol import FORM_FIELDS, LENGTHS, superb_profile, utterance_macs
from upstream_compressed.testing.checkpoints import HUBERT_BASE, make_hubert_checkpoint
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


def protocol_macs(config: ModelConfig, samples: int) -> int:
    """The analytic count plus what the fork's MHA formula adds: bias adds, scaling, mask, softmax x 2, dropout."""
    frames = (samples - 400) // 320 + 1
    extras = 0
    for layer in config.layers:
        inner = layer.num_heads * config.head_dim
        if layer.num_heads:
            extras += 4 * frames * inner + (4 if config.attention_dropout else 3) * layer.num_heads * frames * frames
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
