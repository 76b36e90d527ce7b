"""WavLM in torchaudio's wav2vec2 layout as a base: torchaudio's own ``wavlm_model`` and DPHuBERT's DPWavLM.

References: torchaudio's own ``WavLMSelfAttention`` model (``torchaudio.models.wavlm_model``) for the
stock files, and, for a DPWavLM file (built by slicing a stock one as DPHuBERT's ``prune()`` does), the
unpruned torchaudio model whose removed heads' out_proj columns (removed units' output columns, removed
sublayers' whole output Linear) are zeroed: an independent check of the pruned heads' bias columns and
gate chunks. Hidden states are DPHuBERT's ``extract_features``: projected features, then every layer.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from upstream_compressed.compress import run_recipe
from upstream_compressed.delta import load_compressed, write_delta
from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.config import TORCHAUDIO
from upstream_compressed.model.convert import TORCHAUDIO_FORMAT, CheckpointError, Converted, load_base, to_s3prl_checkpoint
from upstream_compressed.recipe import parse_recipe
from upstream_compressed.testing.torchaudio_checkpoints import (
    load_torchaudio_wavlm,
    make_dpwavlm_checkpoint,
    make_torchaudio_wavlm_checkpoint,
    wavlm_stock_config,
)

TOLERANCE = 1e-5
HEAD_DIM = 9  # wavlm_stock_config: 5 heads of 9
# DPWavLM's pruning: layer 0 keeps a non-prefix subset (the shared bias keeps all 5 columns), layer 2 has no
# head left (DPHuBERT then removes the sublayer and saves []), layer 1 also loses FFN units, layer 3 its FFN.
REMAINING = [[1, 3, 4], [2], [], [0, 1, 2, 3, 4]]
FFN_UNITS = [None, list(range(0, 37, 3)), None, None]
USE_FFN = [True, True, True, False]


def stock_variant(name: str) -> dict:
    if name == "post_ln":
        return wavlm_stock_config(layers=4)
    return wavlm_stock_config(layers=4, extractor_mode="layer_norm", layer_norm_first=True, conv_bias=True)


def torchaudio_wavlm_states(model, wavs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """DPHuBERT's ``extract_features`` ([projected features] + layers) from torchaudio's own WavLM, padded batch.

    torchaudio's ``get_intermediate_outputs`` hands WavLMSelfAttention the additive mask, which it refuses
    (it asserts ``attention_mask is None``); so the layers are run as that loop does, with the padding given
    as WavLMSelfAttention's own ``key_padding_mask`` (DPHuBERT adds -10000 there: the same probabilities).
    """
    lengths = torch.tensor([len(w) for w in wavs])
    batch = pad_sequence(wavs, batch_first=True)
    with torch.no_grad():
        features, frames = model.feature_extractor(batch, lengths)
        projected, _ = model.encoder._preprocess(features, frames)
        padding = torch.arange(projected.shape[1])[None, :] >= frames[:, None]
        padding = torch.zeros(padding.shape).masked_fill(padding, float("-inf"))  # its float form: no warning
        transformer = model.encoder.transformer
        x, bias, states = transformer._preprocess(projected), None, [projected]
        for layer in transformer.layers:
            x, bias = layer(x, None, position_bias=bias, key_padding_mask=padding)
            states.append(x)
    return states, frames


def our_states(converted: Converted, wavs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    model = SpeechTransformer.from_state_dict(converted.config, converted.state_dict).eval()
    with torch.no_grad():
        return model(pad_sequence(wavs, batch_first=True), torch.tensor([len(w) for w in wavs]))


def assert_same_states(ours: list[torch.Tensor], theirs: list[torch.Tensor], padding: torch.Tensor) -> float:
    assert len(ours) == len(theirs)
    worst = 0.0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, f"hidden state {i}"
        difference = (a - b).abs()[~padding].max().item()
        assert difference < TOLERANCE, f"hidden state {i}: {difference}"
        worst = max(worst, difference)
    return worst


def kept_ids(layer) -> list[int]:
    """A layer's kept original heads (None in the config means the first num_heads, in order)."""
    return layer.head_ids if layer.head_ids is not None else list(range(layer.num_heads))


def zeroed_reference(stock_path, remaining, ffn_units, use_ffn, use_attention=None):
    """The unpruned torchaudio model computing what the DPWavLM file should: removed parts' outputs zeroed.

    ``use_attention`` (default: whether any head remains) False: the sublayer is gone, bias included."""
    model = load_torchaudio_wavlm(stock_path)
    use_attention = [bool(heads) for heads in remaining] if use_attention is None else use_attention
    with torch.no_grad():
        for layer, heads, units, ffn, attention in zip(model.encoder.transformer.layers, remaining, ffn_units,
                                                       use_ffn, use_attention):
            out = layer.attention.attention.out_proj
            if not attention:  # a removed sublayer adds nothing, not even out_proj's bias
                out.weight.zero_()
                out.bias.zero_()
            for head in set(range(5)) - set(heads):
                out.weight[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0
            dense = layer.feed_forward.output_dense
            if not ffn:
                dense.weight.zero_()
                dense.bias.zero_()
            elif units is not None:
                dense.weight[:, sorted(set(range(dense.in_features)) - set(units))] = 0
    return model


@pytest.fixture(params=["post_ln", "pre_ln"])
def files(request, tmp_path):
    """(stock torchaudio WavLM file, its DPWavLM teacher file, its DPWavLM-pruned file)."""
    stock = make_torchaudio_wavlm_checkpoint(tmp_path / "stock.pth", stock_variant(request.param))
    teacher = make_dpwavlm_checkpoint(tmp_path / "teacher.pth", stock)
    pruned = make_dpwavlm_checkpoint(tmp_path / "pruned.pth", stock, remaining_heads=REMAINING, ffn_units=FFN_UNITS,
                                     use_feed_forward=USE_FFN)
    return stock, teacher, pruned


# ------------------------------------------------------------------------------------ parity
def test_the_reference_loop_is_torchaudio_s_extract_features(tmp_path):
    """Without padding torchaudio runs its own extract_features: the helper above gives the same."""
    model = load_torchaudio_wavlm(make_torchaudio_wavlm_checkpoint(tmp_path / "s.pth"))
    wav = torch.randn(1, 9000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        layers, _ = model.extract_features(wav)
    states, _ = torchaudio_wavlm_states(model, [wav[0]])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(states[1:], layers))


def test_hidden_states_match_torchaudio_s_wavlm_on_a_padded_batch(files, padded_batch):
    stock, teacher, _ = files
    theirs, frames = torchaudio_wavlm_states(load_torchaudio_wavlm(stock), padded_batch)
    for path in (stock, teacher):  # the teacher holds the same weights in DPHuBERT's layout
        converted = load_base(path)
        ours, padding = our_states(converted, padded_batch)
        assert len(ours) == converted.config.num_layers + 1 == 5
        assert padding.any(), "the batch must contain padding for this test to mean anything"
        assert torch.equal(~padding, torch.arange(padding.shape[1])[None, :] < frames[:, None])
        assert_same_states(ours, theirs, padding)


def test_a_dpwavlm_pruned_file_equals_the_unpruned_model_with_the_removed_parts_zeroed(files, padded_batch):
    stock, _, pruned = files
    converted = load_base(pruned)
    layers = converted.config.layers
    assert [(layer.num_heads, layer.head_ids, layer.attention) for layer in layers] == [
        (3, [1, 3, 4], True), (1, [2], True), (0, None, False), (5, None, True)]
    assert [(layer.ffn_dim, layer.ffn) for layer in layers] == [(37, True), (13, True), (37, True), (0, False)]
    theirs, _ = torchaudio_wavlm_states(zeroed_reference(stock, REMAINING, FFN_UNITS, USE_FFN), padded_batch)
    ours, padding = our_states(converted, padded_batch)
    assert_same_states(ours, theirs, padding)


def test_the_bias_and_the_gate_change_the_states(files, padded_batch):
    """So the parity tests above could not pass with either of them ignored or mis-sliced."""
    converted = load_base(files[2])
    reference, padding = our_states(converted, padded_batch)
    for key in ("relative_position_bias.weight", "layers.1.attention.gate_scale", "layers.0.attention.gate.weight"):
        state = dict(converted.state_dict)
        state[key] = state[key] * 0.5
        changed, _ = our_states(Converted(converted.config, state, converted.source_format), padded_batch)
        assert (changed[-1] - reference[-1]).abs()[~padding].max().item() > 1e-3, key


# -------------------------------------------------------------------------------- reading files
def test_load_base_reads_both_flavours(files):
    stock, teacher, pruned = files
    full = torch.load(stock, weights_only=True)["state_dict"]
    for path, flavour in ((stock, "torchaudio"), (teacher, "dphubert"), (pruned, "dphubert")):
        converted = load_base(path)
        c = converted.config
        assert converted.source_format == TORCHAUDIO_FORMAT and c.kind == TORCHAUDIO
        assert converted.extras["flavour"] == flavour
        assert (c.relative_position_buckets, c.max_relative_distance, c.gated_relative_position) == (10, 24, True)
        assert (c.embed_dim, c.head_dim, c.relative_position_heads) == (45, 9, 5)
        assert torch.equal(converted.state_dict["relative_position_bias.weight"],
                           full["encoder.transformer.layers.0.attention.rel_attn_embed.weight"])
    state = load_base(pruned).state_dict
    for i, heads in enumerate(REMAINING):  # gate_scale: the kept heads' entries of the full-width constant
        const = full[f"encoder.transformer.layers.{i}.attention.gru_rel_pos_const"].reshape(-1)
        key = f"layers.{i}.attention.gate_scale"
        assert (key in state) == bool(heads)
        if heads:
            assert torch.equal(state[key], const[heads])


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["state_dict"].update({"encoder.transformer.layers.1.attention.gru_rel_pos_const": torch.ones(1, 1, 1, 1)}),
     r"layer 1: .*gru_rel_pos_const has shape \(1, 1, 1, 1\), expected \(1, 5, 1, 1\)"),
    (lambda c: c["config"].update(encoder_remaining_heads=[[1, 3, 4], [2], [], [0, 1, 2, 3]]),
     r"layer 3: the config says 4 heads of 9"),
    (lambda c: c["config"].update(encoder_remaining_heads=[[1, 3, 9], [2], [], [0, 1, 2, 3, 4]]),
     "not distinct heads below 5"),
    (lambda c: c["config"].pop("encoder_num_buckets"), "needs encoder_num_buckets"),
    (lambda c: c["state_dict"].pop("encoder.transformer.layers.0.attention.rel_attn_embed.weight"),
     "relative position bias lives in"),
    (lambda c: c["state_dict"].pop("encoder.transformer.layers.3.attention.gru_rel_pos_linear.weight"),
     "layer 3: .* missing"),
])
def test_malformed_wavlm_files_are_refused_naming_the_problem(tmp_path, edit, message):
    stock = make_torchaudio_wavlm_checkpoint(tmp_path / "s.pth", wavlm_stock_config(layers=4))
    path = make_dpwavlm_checkpoint(tmp_path / "d.pth", stock, remaining_heads=REMAINING)
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=message):
        load_base(path)


def test_a_dpwavlm_without_layer_0_attention_is_refused(tmp_path):
    """DPHuBERT builds the bias in layer 0's attention only: removing it leaves no bias anywhere."""
    stock = make_torchaudio_wavlm_checkpoint(tmp_path / "s.pth", wavlm_stock_config(layers=4))
    path = make_dpwavlm_checkpoint(tmp_path / "d.pth", stock, remaining_heads=[[], [2], [0], [1]])
    with pytest.raises(CheckpointError, match=r"encoder_use_attention\[0\] is false"):
        load_base(path)


# -------------------------------------------------------------------------------- round trips
def test_round_trip_ours_to_the_file_and_back_is_exact(files, tmp_path):
    for path in files:
        converted = load_base(path)
        written = tmp_path / "written.pth"
        torch.save(to_s3prl_checkpoint(converted), written)
        original, rewritten = (torch.load(p, weights_only=True) for p in (path, written))
        assert rewritten["config"] == original["config"], path.name
        assert rewritten["state_dict"].keys() == original["state_dict"].keys(), path.name
        assert all(torch.equal(rewritten["state_dict"][k], v) for k, v in original["state_dict"].items()), path.name
        again = load_base(written)
        assert again.config == converted.config
        assert all(torch.equal(again.state_dict[k], v) for k, v in converted.state_dict.items())


def test_a_stock_file_written_back_loads_in_torchaudio_itself(tmp_path, padded_batch):
    from torchaudio.models import wavlm_model

    converted = load_base(make_torchaudio_wavlm_checkpoint(tmp_path / "s.pth"))
    written = to_s3prl_checkpoint(converted)
    model = wavlm_model(**written["config"]).eval()
    model.load_state_dict(written["state_dict"], strict=True)
    theirs, _ = torchaudio_wavlm_states(model, padded_batch)
    ours, padding = our_states(converted, padded_batch)
    assert_same_states(ours, theirs, padding)


def test_head_pruning_a_stock_wavlm_writes_dphubert_s_layout(tmp_path, padded_batch):
    """Reordered, non-prefix kept heads need DPHuBERT's lists; the full-width gate constants come back."""
    stock = make_torchaudio_wavlm_checkpoint(tmp_path / "s.pth", wavlm_stock_config(layers=4))
    converted = load_base(stock)
    model = SpeechTransformer.from_state_dict(converted.config, converted.state_dict).eval()
    model.keep_heads(1, [4, 0])
    model.keep_heads(2, [])
    model.remove_attention(3)
    written = tmp_path / "pruned.pth"
    torch.save(to_s3prl_checkpoint(Converted(model.config, model.state_dict(), converted.source_format,
                                             converted.extras)), written)
    ckpt = torch.load(written, weights_only=True)
    assert ckpt["config"]["encoder_remaining_heads"] == [[0, 1, 2, 3, 4], [4, 0], [], []]
    assert ckpt["config"]["encoder_use_attention"] == [True, True, True, False]
    assert "encoder_num_heads" not in ckpt["config"]  # DPHuBERT's wavlm_model has no such argument
    original = torch.load(stock, weights_only=True)["state_dict"]
    for i in range(3):
        key = f"encoder.transformer.layers.{i}.attention.gru_rel_pos_const"
        assert torch.equal(ckpt["state_dict"][key], original[key])
    again = load_base(written)
    assert [(layer.num_heads, kept_ids(layer), layer.attention) for layer in again.config.layers] == \
        [(layer.num_heads, kept_ids(layer), layer.attention) for layer in model.config.layers]
    # Layer 2 keeps its (empty) attention, so out_proj's bias; layer 3's is removed.
    reference = zeroed_reference(stock, [range(5), [4, 0], [], []], [None] * 4, [True] * 4, [True, True, True, False])
    theirs, _ = torchaudio_wavlm_states(reference, padded_batch)
    ours, padding = our_states(again, padded_batch)
    assert_same_states(ours, theirs, padding)


def test_removing_layer_0_attention_is_refused_when_writing(tmp_path):
    converted = load_base(make_torchaudio_wavlm_checkpoint(tmp_path / "s.pth"))
    model = SpeechTransformer.from_state_dict(converted.config, converted.state_dict)
    model.remove_attention(0)
    with pytest.raises(ValueError, match="layer 0's attention"):
        to_s3prl_checkpoint(Converted(model.config, model.state_dict(), converted.source_format, converted.extras))


# --------------------------------------------------------------------------------- upstreams
def test_dphubert_local_runs_a_dpwavlm_file_through_s3prl_hub(tmp_path, s3prl_hub, padded_batch):
    stock = make_torchaudio_wavlm_checkpoint(tmp_path / "s.pth", wavlm_stock_config(layers=4))
    path = make_dpwavlm_checkpoint(tmp_path / "d.pth", stock, remaining_heads=REMAINING, ffn_units=FFN_UNITS,
                                   use_feed_forward=USE_FFN)
    upstream = s3prl_hub.dphubert_local(ckpt=str(path), model_config=None, refresh=False)
    with torch.no_grad():
        result = upstream([w.clone() for w in padded_batch])
    assert len(result["hidden_states"]) == 5 and upstream.get_downsample_rates("hidden_states") == 320
    theirs, _ = torchaudio_wavlm_states(zeroed_reference(stock, REMAINING, FFN_UNITS, USE_FFN), padded_batch)
    assert_same_states(list(result["hidden_states"]), theirs, ~result["pad_mask"])


# ------------------------------------------------------------------------------- compression
def test_a_head_pruning_recipe_on_a_dpwavlm_file_gives_a_delta_that_rebuilds(tmp_path, padded_batch):
    stock = make_torchaudio_wavlm_checkpoint(tmp_path / "s.pth", wavlm_stock_config(layers=4))
    base = make_dpwavlm_checkpoint(tmp_path / "dpwavlm.pth", stock, remaining_heads=REMAINING, ffn_units=FFN_UNITS,
                                   use_feed_forward=USE_FFN)
    recipe = parse_recipe({"base": str(base), "steps": [
        {"method": "head_pruning", "ratio": 0.5, "criterion": "l1", "selection": "global"}]})
    delta = run_recipe(recipe, work_dir=tmp_path / "work")
    assert delta.technique == "headpruned" and delta.base_family == "dphubert"
    base_layers = load_base(base).config.layers
    kept = [origin["kept_heads"] if origin["kept_heads"] is not None else list(range(layer.num_heads))
            for origin, layer in zip(delta.manifest["structure"]["layers"], base_layers)]
    assert sum(map(len, kept)) < sum(layer.num_heads for layer in base_layers)
    # Head ids compose: the kept heads' original indices, into the shared bias and the gate.
    ids = [kept_ids(layer) for layer in base_layers]
    expected_ids = [[ids[i][h] for h in heads] for i, heads in enumerate(kept)]
    assert [kept_ids(layer) for layer in delta.config.layers] == expected_ids
    path = write_delta(delta, tmp_path / "d.safetensors")
    model, _ = load_compressed(path, base)
    # Independently: the unpruned torchaudio model with every head not finally kept zeroed.
    final = [sorted(heads) if base_layers[i].attention else [] for i, heads in enumerate(expected_ids)]
    # A layer the recipe empties keeps its sublayer (so out_proj's bias), unless that was removed in the file.
    reference = zeroed_reference(stock, final, FFN_UNITS, USE_FFN, [layer.attention for layer in delta.config.layers])
    theirs, _ = torchaudio_wavlm_states(reference, padded_batch)
    with torch.no_grad():
        ours, padding = model.eval()(pad_sequence(padded_batch, batch_first=True),
                                     torch.tensor([len(w) for w in padded_batch]))
    assert_same_states(ours, theirs, padding)
