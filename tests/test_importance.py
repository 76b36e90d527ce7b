"""Head and FFN-unit importance against answers known without the criterion's own code.

The data-driven criterion (``compress/importance.py``) is Michel et al.'s: a gate xi = 1 on each
head's (unit's) output, L = <r, f(x)> for Gaussian projections r of all hidden states on the valid
frames, score = sqrt(mean over batches and projections of (dL/dxi)^2). Since E_r[(r . g)^2] = ||g||^2,
the score estimates sqrt(mean over batches of ||df/dxi||^2), so:

* a head whose out_proj columns are zero (a unit whose fc2 column is zero) never reaches f: 0 exactly;
* scaling a head's value projection (weight and bias) by k scales its output by k, so the model with
  gate xi computes f_1(k xi) and its score is k |f_1'(k)|: exactly k times the old score where f is
  affine in that head's output (the last layer of a pre-LN model whose states are layer outputs, with
  no FFN after the attention), and exactly 1 times it when out_proj's columns are divided by k (the
  same function);
* removing a head changes f by f(1) - f(0), which equals df/dxi up to second order when the head's
  contribution is small: the score then predicts the measured change of the hidden states.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from upstream_compressed.audio import load_audio, sample_audio
from upstream_compressed.compress.head_pruning import l1_head_scores
from upstream_compressed.compress.importance import data_driven_scores
from upstream_compressed.compress.row_pruning import l1_unit_scores
from upstream_compressed.model import DISTILLER, LayerConfig, ModelConfig, SpeechTransformer
from upstream_compressed.model.convert import load_base
from upstream_compressed.model.layers import factorize

TINY_CONV = [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2
BATCH = 4


@pytest.fixture(scope="module")
def hubert(hubert_ckpt) -> SpeechTransformer:
    """The tiny real-format HuBERT (post-LN, 2 layers x 4 heads, FFN 128), never modified: tests copy it."""
    base = load_base(hubert_ckpt)
    return SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()


def affine_last_layer_model(last_ffn: int) -> SpeechTransformer:
    """A pre-LN distiller-layout model whose last state is the last layer's output, no norm after it.

    out_L = x + attention(LN(x)) + FFN(LN(x + attention)): affine in the last layer's FFN gates, and
    in its head gates too when that FFN has no units (it then adds only fc2's bias).
    """
    torch.manual_seed(0)
    config = ModelConfig(kind=DISTILLER, embed_dim=32, head_dim=8,
                         layers=[LayerConfig(4, 48), LayerConfig(4, last_ffn)], conv_layers=TINY_CONV, conv_pos=16,
                         conv_pos_groups=4, layer_norm_first=True, feature_layer_norm=False)
    return SpeechTransformer(config).eval()


def scores(model: SpeechTransformer, kind: str, audio_dir, projections: int = 8) -> list[torch.Tensor]:
    return data_driven_scores(copy.deepcopy(model), kind, str(audio_dir), batch_size=BATCH, projections=projections)


def head_columns(model: SpeechTransformer, layer: int, head: int) -> slice:
    size = model.config.head_dim
    return slice(head * size, (head + 1) * size)


# ------------------------------------------------------------------------------- data-driven, exact
def test_a_head_or_unit_that_never_reaches_the_output_scores_zero(hubert, audio_dir):
    model = copy.deepcopy(hubert)
    with torch.no_grad():
        model.layers[0].attention.out_proj.weight[:, head_columns(model, 0, 2)] = 0
        model.layers[1].feed_forward.fc2.weight[:, 5] = 0
    heads, units = scores(model, "heads", audio_dir), scores(model, "units", audio_dir)
    assert heads[0][2] == 0.0 and units[1][5] == 0.0
    assert (heads[0][[0, 1, 3]] > 0).all() and (heads[1] > 0).all()
    assert (units[1][torch.arange(128) != 5] > 0).all() and (units[0] > 0).all()


@pytest.mark.parametrize("k", [3.0, 0.25])
def test_scaling_a_head_s_values_by_k_scales_its_score_by_k_where_the_output_is_affine_in_it(audio_dir, k):
    model = affine_last_layer_model(last_ffn=0)
    scaled = copy.deepcopy(model)
    v_proj, rows = scaled.layers[1].attention.v_proj, head_columns(scaled, 1, 1)
    with torch.no_grad():
        v_proj.weight[rows] *= k
        v_proj.bias[rows] *= k
    before, after = scores(model, "heads", audio_dir), scores(scaled, "heads", audio_dir)
    assert before[1][1] > 0
    torch.testing.assert_close(after[1][1], k * before[1][1], rtol=1e-4, atol=0)
    # The layer's other heads: attention weights and outputs untouched, f affine: same scores.
    torch.testing.assert_close(after[1][[0, 2, 3]], before[1][[0, 2, 3]], rtol=1e-4, atol=0)


@pytest.mark.parametrize("k", [3.0, 0.25])
def test_scaling_a_unit_s_fc2_column_by_k_scales_its_score_by_k_in_the_last_pre_ln_layer(audio_dir, k):
    model = affine_last_layer_model(last_ffn=24)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.layers[1].feed_forward.fc2.weight[:, 7] *= k
    before, after = scores(model, "units", audio_dir), scores(scaled, "units", audio_dir)
    torch.testing.assert_close(after[1][7], k * before[1][7], rtol=1e-4, atol=0)
    others = torch.arange(24) != 7
    torch.testing.assert_close(after[1][others], before[1][others], rtol=1e-4, atol=0)


def test_values_times_k_and_out_proj_divided_by_k_is_the_same_function_and_the_same_score(hubert, audio_dir):
    """In the real post-LN HuBERT layout; L1 magnitude, which reads the weights, does see the change."""
    scaled = copy.deepcopy(hubert)
    attention, rows, k = scaled.layers[0].attention, head_columns(scaled, 0, 3), 4.0
    with torch.no_grad():
        attention.v_proj.weight[rows] *= k
        attention.v_proj.bias[rows] *= k
        attention.out_proj.weight[:, rows] /= k
    before, after = scores(hubert, "heads", audio_dir), scores(scaled, "heads", audio_dir)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=0)
    assert l1_head_scores(scaled)[0][3] > l1_head_scores(hubert)[0][3]


# ------------------------------------------------------------------- data-driven against measurement
def batches(audio_dir) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The scorer's own batches: its sample of files (all 8 here), ``BATCH`` at a time, at most 8 s each."""
    files = sample_audio(str(audio_dir), 32, 0)
    out = []
    for i in range(0, len(files), BATCH):
        wavs = [load_audio(f, 8.0) for f in files[i:i + BATCH]]
        out.append((pad_sequence(wavs, batch_first=True), torch.tensor([len(w) for w in wavs])))
    return out


def valid_states(model: SpeechTransformer, data) -> list[list[torch.Tensor]]:
    """Per batch, every hidden state with its padded frames zeroed."""
    out = []
    with torch.no_grad():
        for wav, lengths in data:
            states, padding = model(wav, lengths)
            out.append([state * (~padding)[..., None] for state in states])
    return out


def measured_change(full: list[list[torch.Tensor]], reduced: SpeechTransformer, data) -> float:
    """sqrt(mean over batches of ||f(model) - f(reduced)||^2), all hidden states, valid frames only."""
    total = sum((a - b).pow(2).sum().item()
                for batch, smaller in zip(full, valid_states(reduced, data)) for a, b in zip(batch, smaller))
    return (total / len(data)) ** 0.5


def assert_scores_predict(predicted: list[float], measured: list[float], tolerance: float) -> None:
    """Each score within ``tolerance`` of its measurement, so every pair apart by more than twice that is
    ordered alike (closer pairs are ties within the estimate's noise); the most important head agrees too."""
    for p, m in zip(predicted, measured):
        assert p == pytest.approx(m, rel=tolerance), (predicted, measured)
    separated = [(i, j) for i in range(len(measured)) for j in range(len(measured))
                 if measured[i] * (1 + 2 * tolerance) < measured[j]]
    assert separated and all(predicted[i] < predicted[j] for i, j in separated)
    assert max(range(len(predicted)), key=predicted.__getitem__) == max(range(len(measured)), key=measured.__getitem__)


def test_head_scores_predict_the_change_when_each_head_is_pruned(hubert, audio_dir):
    """Each head removed with the real pruning operation (``keep_heads``), hidden states compared.

    out_proj is scaled by 0.02 so that every head's contribution is small: removal (xi 1 -> 0) is then
    a first-order change, which is what the criterion estimates (checked: 0.002 gives the same ratios).
    256 projections bring the estimate's noise to about 3 %; the tolerance is 8 %.
    """
    model = copy.deepcopy(hubert)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.out_proj.weight.mul_(0.02)
    predicted = [float(s) for layer in scores(model, "heads", audio_dir, projections=256) for s in layer]
    data, measured = batches(audio_dir), []
    full = valid_states(model, data)
    for i, layer in enumerate(model.layers):
        heads = range(layer.attention.num_heads)
        for h in heads:
            reduced = copy.deepcopy(model)
            reduced.keep_heads(i, [j for j in heads if j != h])
            measured.append(measured_change(full, reduced, data))
    assert_scores_predict(predicted, measured, tolerance=0.08)


def test_unit_scores_predict_the_change_when_each_unit_is_pruned(hubert, audio_dir):
    """As for heads, with ``keep_units`` on 8 units of each layer and fc2 scaled by 0.02."""
    model = copy.deepcopy(hubert)
    with torch.no_grad():
        for layer in model.layers:
            layer.feed_forward.fc2.weight.mul_(0.02)
    all_scores = scores(model, "units", audio_dir, projections=256)
    data, predicted, measured = batches(audio_dir), [], []
    full = valid_states(model, data)
    for i, layer in enumerate(model.layers):
        units = range(layer.feed_forward.ffn_dim)
        for u in range(0, 128, 16):
            reduced = copy.deepcopy(model)
            reduced.keep_units(i, [j for j in units if j != u])
            predicted.append(float(all_scores[i][u]))
            measured.append(measured_change(full, reduced, data))
    assert_scores_predict(predicted, measured, tolerance=0.08)


# ------------------------------------------------------------------------------------- L1 magnitude
def test_l1_head_score_is_the_head_s_qkv_weight_mass(hubert):
    """q/k/v rows of a head set to constants: the score is 3 x head_dim x embed_dim x |c|.

    Biases and out_proj do not count (set huge here)."""
    model = copy.deepcopy(hubert)
    attention, dim, size = model.layers[1].attention, model.config.embed_dim, model.config.head_dim
    with torch.no_grad():
        for h, c in enumerate((0.0, -0.5, 2.0, 0.125)):
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(attention, name).weight[head_columns(model, 1, h)] = c
                getattr(attention, name).bias[head_columns(model, 1, h)] = 100.0
        attention.out_proj.weight.mul_(100.0)
    expected = torch.tensor([0.0, 0.5, 2.0, 0.125]) * 3 * size * dim
    torch.testing.assert_close(l1_head_scores(model)[1], expected)
    # A low-rank v_proj is scored by the matrix it applies (here exactly rank 1).
    model.replace_linear(1, "v_proj", factorize(model.linear(1, "v_proj"), 1))
    torch.testing.assert_close(l1_head_scores(model)[1], expected, rtol=1e-4, atol=1e-3)


def test_l1_unit_score_is_fc1_row_plus_fc2_column_mass(hubert):
    model = copy.deepcopy(hubert)
    ffn, dim = model.layers[0].feed_forward, model.config.embed_dim
    with torch.no_grad():
        ffn.fc1.weight[:3] = torch.tensor([[1.0], [0.0], [-0.25]])
        ffn.fc2.weight[:, :3] = torch.tensor([[0.5, 0.0, 3.0]])
        ffn.fc1.bias[:3] = 100.0
    torch.testing.assert_close(l1_unit_scores(model)[0][:3], torch.tensor([1.5, 0.0, 3.25]) * dim)
    # A weight-pruning mask removes the pruned weights' mass: half of unit 0's fc1 row pruned.
    keep = torch.ones_like(ffn.fc1.weight, dtype=torch.bool)
    keep[0, : dim // 2] = False
    model.prune_weights(0, "fc1", keep)
    assert float(l1_unit_scores(model)[0][0]) == pytest.approx(1.0 * dim)


# ------------------------------------------------------------- data-driven, what it leaves behind
def test_scoring_leaves_the_model_as_it_found_it(hubert, audio_dir):
    model = copy.deepcopy(hubert).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data_driven_scores(model, "heads", str(audio_dir), max_utterances=2, batch_size=2, projections=1)
    assert model.training  # the mode it had, not eval
    assert all(p.requires_grad for p in model.parameters())  # trainable again
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    hooked = [name for name, m in model.named_modules() if m._forward_pre_hooks]
    assert hooked == []  # no gate left on out_proj / fc2
    model.eval()
    data_driven_scores(model, "units", str(audio_dir), max_utterances=2, batch_size=2, projections=1)
    assert not model.training


@pytest.mark.parametrize("kind", ["heads", "units"])
def test_a_layer_with_nothing_left_scores_empty_and_the_others_still_score(hubert, audio_dir, kind):
    model = copy.deepcopy(hubert)
    if kind == "heads":
        model.keep_heads(0, [])
    else:
        model.keep_units(0, [])
    first, second = data_driven_scores(model, kind, str(audio_dir), max_utterances=4, batch_size=2, projections=2)
    assert first.numel() == 0
    assert second.numel() == (4 if kind == "heads" else 128) and bool((second > 0).all())


@pytest.mark.parametrize("kind", ["heads", "units"])
def test_the_documented_defaults_are_32_utterances_of_8_s_in_batches_of_4_with_4_projections(hubert, long_audio_dir,
                                                                                              kind):
    default = data_driven_scores(copy.deepcopy(hubert), kind, str(long_audio_dir))
    explicit = data_driven_scores(copy.deepcopy(hubert), kind, str(long_audio_dir), 32, 8.0, 4, 4, 0)
    assert all(torch.equal(a, b) for a, b in zip(default, explicit))


def test_scores_see_only_the_first_max_seconds_and_the_seeds_sample_of_the_files(hubert, audio_dir, tmp_path):
    import soundfile

    files = sample_audio(audio_dir, 3, seed=1)
    assert files != sample_audio(audio_dir, 3, seed=0)  # the seed matters for this corpus
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in files:  # just the seed's sample, each cut to its first 0.5 s
        soundfile.write(cut / f"{f.stem}.wav", load_audio(f, 0.5).numpy(), 16000, subtype="FLOAT")
    for kind in ("heads", "units"):
        sampled = data_driven_scores(copy.deepcopy(hubert), kind, str(audio_dir), 3, 0.5, 2, 2, seed=1)
        alone = data_driven_scores(copy.deepcopy(hubert), kind, str(cut), 3, 30.0, 2, 2, seed=1)
        assert all(torch.equal(a, b) for a, b in zip(sampled, alone))


def test_a_one_layer_model_is_scored(audio_dir):
    """Every tensor goes to the device of the gates, whichever layer's (a survivor read the second layer's)."""
    torch.manual_seed(0)
    config = ModelConfig(kind=DISTILLER, embed_dim=32, head_dim=8, layers=[LayerConfig(4, 48)], conv_layers=TINY_CONV,
                         conv_pos=16, conv_pos_groups=4, layer_norm_first=True, feature_layer_norm=False)
    model = SpeechTransformer(config).eval()
    for kind, size in (("heads", 4), ("units", 48)):
        (layer,) = data_driven_scores(model, kind, str(audio_dir), max_utterances=4, batch_size=2, projections=2)
        assert layer.shape == (size,) and bool((layer > 0).all())
