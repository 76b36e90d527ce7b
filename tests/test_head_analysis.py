"""Head analysis: diagonality is measured right, the command writes its table and plot, and the
diagonal criteria of head pruning remove the intended heads."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from upstream_compressed.audio import load_audio, sample_audio
from upstream_compressed.cli import main as cli_main
from upstream_compressed.compress import run_recipe
from upstream_compressed.compress.diagonality import attention_probabilities, band_mass, diagonality_scores
from upstream_compressed.compress.head_pruning import l1_head_scores
from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import load_base
from upstream_compressed.recipe import RecipeError, parse_recipe
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint

from helpers import run_model


# ---------------------------------------------------------------------------------- the measure
def test_diagonality_of_constructed_attention():
    time, band = 10, 1
    identity = torch.eye(time)
    uniform = torch.full((time, time), 1 / time)
    shifted = torch.roll(torch.eye(time), shifts=3, dims=1)  # every frame looks 3 frames ahead
    probs = torch.stack([identity, uniform, shifted])[None]  # (1, 3 heads, T, T)
    mass = band_mass(probs, None, band)[0]
    # uniform: row i sees the keys within ±1 of it: 2 at the edges, 3 inside
    expected_uniform = (2 * 2 + 3 * (time - 2)) / time / time
    assert torch.allclose(mass, torch.tensor([1.0, expected_uniform, 0.0]))


def test_diagonality_ignores_padded_queries_and_keys():
    valid, time, band = 4, 7, 0
    padding = torch.arange(time)[None, :] >= valid
    uniform_on_valid = torch.zeros(1, 1, time, time)
    uniform_on_valid[..., :valid] = 1 / valid  # what a key padding mask gives every row
    # only the 4 valid query rows count, each with mass 1/4 on its own frame
    assert torch.allclose(band_mass(uniform_on_valid, padding, band), torch.tensor([[1 / valid]]))


def test_recomputed_probabilities_are_the_ones_sdpa_uses(hubert_ckpt, padded_batch):
    base = load_base(hubert_ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
    seen = {}
    attention = model.layers[1].attention
    handle = attention.register_forward_pre_hook(lambda module, inputs: seen.update(x=inputs[0], pad=inputs[1]))
    _, padding = run_model(model, padded_batch)
    handle.remove()
    with torch.no_grad():
        probs = attention_probabilities(attention, seen["x"], seen["pad"])
        values = attention.v_proj(seen["x"]).unflatten(-1, (attention.num_heads, -1)).transpose(1, 2)
        expected = F.scaled_dot_product_attention(
            attention.q_proj(seen["x"]).unflatten(-1, (attention.num_heads, -1)).transpose(1, 2),
            attention.k_proj(seen["x"]).unflatten(-1, (attention.num_heads, -1)).transpose(1, 2),
            values, attn_mask=~seen["pad"][:, None, None, :])
    assert torch.allclose(probs @ values, expected, atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert float(probs.masked_select(padding[:, None, None, :]).abs().max()) == 0.0


def test_recomputed_probabilities_include_wavlms_gated_position_bias(tmp_path, padded_batch):
    """On WavLM the probabilities carry the relative position bias and its gate, for the heads a layer kept."""
    from upstream_compressed.testing.wavlm_checkpoints import make_wavlm_checkpoint

    base = load_base(make_wavlm_checkpoint(tmp_path / "wavlm.pt"))
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
    model.keep_heads(1, [2, 0])  # original heads 2 and 0: their rows of the shared bias
    attention, seen = model.layers[1].attention, {}
    handles = [attention.register_forward_pre_hook(lambda module, inputs: seen.update(inputs=inputs)),
               attention.register_forward_hook(lambda module, inputs, output: seen.update(output=output))]
    _, padding = run_model(model, padded_batch)
    for handle in handles:
        handle.remove()
    x, pad, bias = seen["inputs"]
    assert bias is not None
    with torch.no_grad():
        probs = attention_probabilities(attention, x, pad, bias)
        values = attention.v_proj(x).unflatten(-1, (attention.num_heads, -1)).transpose(1, 2)
        recomputed = attention.out_proj((probs @ values).transpose(1, 2).flatten(2))
        without_bias = attention_probabilities(attention, x, pad)
    assert torch.allclose(recomputed, seen["output"], atol=1e-5)
    assert not torch.allclose(probs, without_bias, atol=1e-3)  # the bias matters on this model
    assert float(probs.masked_select(padding[:, None, None, :]).abs().max()) == 0.0


# ------------------------------------------------------------------------ constructed diagonal heads
DIAGONAL = {0: 1, 1: 3}  # layer -> head made to attend to frames like its own (q = k)
ANTI = {0: 2, 1: 0}  # layer -> head made to attend to frames unlike its own (q = -k)
UNIFORM = (0, 0)  # (layer, head) made to attend evenly (q = 0)


@pytest.fixture(scope="module")
def shaped_ckpt(tmp_path_factory):
    """A tiny HuBERT with heads made diagonal, anti-diagonal and uniform by their q/k projections."""
    path = make_hubert_checkpoint(tmp_path_factory.mktemp("shaped") / "shaped.pt", seed=3)
    ckpt = torch.load(path, weights_only=False)
    weights, head_dim = ckpt["model_weight"], 64 // 4

    def shape(layer: int, head: int, sign: float) -> None:
        rows = slice(head * head_dim, (head + 1) * head_dim)
        p = f"encoder.layers.{layer}.self_attn"
        weights[f"{p}.k_proj.weight"][rows] *= 6  # sharp: softmax close to its arg max
        weights[f"{p}.q_proj.weight"][rows] = sign * weights[f"{p}.k_proj.weight"][rows]
        weights[f"{p}.q_proj.bias"][rows] = weights[f"{p}.k_proj.bias"][rows] = 0

    for layer, head in DIAGONAL.items():
        shape(layer, head, 1.0)
    for layer, head in ANTI.items():
        shape(layer, head, -1.0)
    shape(*UNIFORM, 0.0)
    torch.save(ckpt, path)
    return path


def test_constructed_heads_have_the_expected_diagonality(shaped_ckpt, audio_dir):
    base = load_base(shaped_ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    scores = diagonality_scores(model, str(audio_dir), band=1, max_utterances=4, batch_size=1)
    # A uniform head over n frames keeps (3n - 2) / n^2 within ±1 frame; averaged over the utterances.
    frames = [run_model(model, [load_audio(f)])[0][0].shape[1] for f in sample_audio(audio_dir, 4, seed=0)]
    uniform = sum((3 * n - 2) / n**2 for n in frames) / len(frames)
    assert float(scores[UNIFORM[0]][UNIFORM[1]]) == pytest.approx(uniform, rel=1e-5)
    for layer in range(2):
        assert int(scores[layer].argmax()) == DIAGONAL[layer] and int(scores[layer].argmin()) == ANTI[layer]
        assert float(scores[layer][DIAGONAL[layer]]) > 4 * uniform
        assert float(scores[layer][ANTI[layer]]) < uniform  # less diagonal than even attention


@pytest.mark.parametrize("criterion,removed", [("diagonal_first", DIAGONAL), ("diagonal_last", ANTI)])
@pytest.mark.parametrize("selection", ["per_layer", "global"])
def test_diagonal_criteria_prune_the_intended_heads(tmp_path, shaped_ckpt, audio_dir, criterion, removed, selection):
    step = {"method": "head_pruning", "ratio": 0.25, "criterion": criterion, "selection": selection,
            "audio": str(audio_dir), "max_utterances": 4, "diagonal_band": 1}
    delta = run_recipe(parse_recipe({"base": str(shaped_ckpt), "steps": [step]}), work_dir=tmp_path)
    kept = [origin.kept_heads for origin in delta.structure.layers]
    assert kept == [[h for h in range(4) if h != removed[layer]] for layer in range(2)]


@pytest.mark.parametrize("step,message", [
    ({"method": "row_pruning", "ratio": 0.5, "criterion": "diagonal_first", "audio": "x"}, r"steps\[0\]\.criterion"),
    ({"method": "head_pruning", "ratio": 0.5, "criterion": "diagonal_last"}, r"diagonal_last criterion needs `audio"),
    ({"method": "head_pruning", "ratio": 0.5, "criterion": "l1", "diagonal_band": 2}, r"diagonal_band: only"),
    ({"method": "head_pruning", "ratio": 0.5, "criterion": "diagonal_first", "audio": "x", "diagonal_band": -1},
     r"diagonal_band: expected a number of frames >= 0"),
])
def test_bad_diagonal_options_are_refused(step, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"base": "x.pt", "steps": [step]})


# ----------------------------------------------------------------------------------- the command
def test_analyse_heads_writes_table_and_plot(tmp_path, shaped_ckpt, audio_dir, capsys):
    out = tmp_path / "analysis"
    assert cli_main(["analyse", "heads", "--base", str(shaped_ckpt), "--audio", str(audio_dir), "-o", str(out),
                     "--diagonal-band", "1", "--max-utterances", "4"]) == 0
    rows = list(csv.DictReader((out / "heads.csv").open()))
    assert len(rows) == 8
    base = load_base(shaped_ckpt)
    l1 = l1_head_scores(SpeechTransformer.from_state_dict(base.config, base.state_dict))
    for row in rows:
        layer, head = int(row["layer"]), int(row["head"])
        assert float(row["l1"]) == pytest.approx(float(l1[layer][head]), rel=1e-6)
        assert 0.0 <= float(row["diagonality"]) <= 1.0 and float(row["data_driven"]) >= 0.0
    by_head = {(int(r["layer"]), int(r["head"])): float(r["diagonality"]) for r in rows}
    assert max(by_head, key=by_head.get) in DIAGONAL.items() and min(by_head, key=by_head.get) in ANTI.items()
    for order in ("prune_order_l1", "prune_order_data_driven"):
        assert sorted(int(r[order]) for r in rows) == list(range(8))
    table = json.loads((out / "heads.json").read_text())
    assert table["diagonal_band"] == 1 and len(table["heads"]) == 8
    assert (out / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "8 heads analysed" in capsys.readouterr().out


def test_analyse_heads_of_a_compressed_upstream(tmp_path, hubert_ckpt, audio_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {hubert_ckpt}\nsteps: [{{method: head_pruning, ratio: 0.5}}]\n")
    delta = tmp_path / "d.safetensors"
    assert cli_main(["compress", str(recipe), "-o", str(delta)]) == 0
    out = tmp_path / "analysis"
    assert cli_main(["analyse", "heads", "--upstream", str(delta), "--audio", str(audio_dir), "-o", str(out),
                     "--max-utterances", "2"]) == 0
    assert len(json.loads((out / "heads.json").read_text())["heads"]) == 4


def test_analyse_heads_refuses_a_missing_model(tmp_path, audio_dir, capsys):
    assert cli_main(["analyse", "heads", "--audio", str(audio_dir), "-o", str(tmp_path)]) == 2
    assert "--upstream DELTA.safetensors or --base CHECKPOINT" in capsys.readouterr().err
