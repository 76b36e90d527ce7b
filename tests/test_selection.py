"""Which heads / units a pruning step keeps: per layer, globally, and by which criterion's scores."""

from __future__ import annotations

import pytest
import torch

from upstream_compressed.compress.diagonality import DEFAULT_BAND, diagonality_scores
from upstream_compressed.compress.importance import data_driven_scores
from upstream_compressed.compress.selection import choose, global_order, keep_global, keep_per_layer, random_scores, score
from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import load_base


def scores(*layers: list[float]) -> list[torch.Tensor]:
    return [torch.tensor(layer) for layer in layers]


# ------------------------------------------------------------------------------------ per layer
def test_per_layer_removes_the_lowest_scores_of_each_layer_and_keeps_the_order_of_the_rest():
    kept = keep_per_layer(scores([0.3, 0.1, 0.5, 0.2], [4.0, 3.0, 2.0, 1.0]), 0.5)
    assert kept == [[0, 2], [0, 1]]


def test_per_layer_ties_remove_the_later_item():
    assert keep_per_layer(scores([1.0, 1.0, 1.0, 1.0]), 0.25) == [[0, 1, 2]]


def test_per_layer_leaves_layers_outside_layers_whole():
    kept = keep_per_layer(scores([3.0, 1.0, 2.0], [3.0, 1.0, 2.0]), 0.34, layers=[1])
    assert kept == [[0, 1, 2], [0, 2]]


@pytest.mark.parametrize("ratio,n,removed", [(0.29, 100, 29), (0.7, 10, 7), (0.5, 3, 1), (0.0, 5, 0)])
def test_ratio_removes_floor_of_ratio_times_count_despite_float_rounding(ratio, n, removed):
    # 0.29 * 100 is 28.999999999999996 in binary floating point: a recipe asking for 29% removes 29
    layer = torch.arange(n, dtype=torch.float32)
    assert keep_per_layer([layer], ratio) == [list(range(removed, n))]
    assert keep_global([layer], ratio, normalize=False) == [list(range(removed, n))]


# --------------------------------------------------------------------------------------- global
def test_global_removes_the_lowest_scores_across_layers():
    # raw scores: the second layer's are all below the first's, so it loses both
    assert keep_global(scores([10.0, 30.0], [1.0, 2.0]), 0.5, normalize=False) == [[0, 1], []]


def test_global_normalisation_divides_each_layer_by_its_l2_norm():
    # normalised: [10, 30] / 31.6 = [0.32, 0.95] and [1, 2] / 2.24 = [0.45, 0.89]: the lowest of each goes
    assert keep_global(scores([10.0, 30.0], [1.0, 2.0]), 0.5, normalize=True) == [[1], [1]]
    # the same holds for layers whose scores are far below 1 (their norm is small, not clamped to 1)
    assert keep_global(scores([1e-3, 3e-3], [1e-4, 2e-4]), 0.5, normalize=True) == [[1], [1]]


def test_global_normalisation_survives_a_layer_of_zeros_and_an_empty_layer():
    order = global_order(scores([0.0, 0.0], [], [1.0, 2.0]), normalize=True)
    assert order == [(0, 0), (0, 1), (2, 0), (2, 1)]  # zeros stay 0 (no NaN from 0 / 0), lowest first


def test_global_order_lists_lowest_first_with_ties_by_layer_then_index():
    order = global_order(scores([2.0, 1.0], [1.0, 0.5]), normalize=False)
    assert order == [(1, 1), (0, 1), (1, 0), (0, 0)]


def test_global_only_competes_within_the_chosen_layers():
    kept = keep_global(scores([1.0, 2.0], [10.0, 20.0], [3.0, 4.0]), 0.5, normalize=False, layers=[1, 2])
    assert kept == [[0, 1], [0, 1], []]  # 3 and 4 are the lowest of the chosen layers; 1 and 2 do not compete
    assert global_order(scores([1.0], [0.5]), normalize=False, layers=[1]) == [(1, 0)]


# ------------------------------------------------------------------------------------- choosing
def test_choose_selects_per_layer_unless_global_is_asked():
    layered = scores([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0])
    assert choose(layered, {"method": "head_pruning", "ratio": 0.5}, 2) == [[2, 3], [2, 3]]
    assert choose(layered, {"method": "head_pruning", "ratio": 0.5, "selection": "per_layer"}, 2) == [[2, 3], [2, 3]]
    assert choose(layered, {"method": "head_pruning", "ratio": 0.5, "selection": "global"}, 2) == [[], [0, 1, 2, 3]]


def test_choose_normalises_only_data_driven_scores():
    layered = scores([10.0, 30.0], [1.0, 2.0])
    step = {"method": "head_pruning", "ratio": 0.5, "selection": "global"}
    assert choose(layered, step, 2) == [[0, 1], []]  # l1 (the default): raw magnitudes compete
    assert choose(layered, {**step, "criterion": "random"}, 2) == [[0, 1], []]
    assert choose(layered, {**step, "criterion": "data_driven"}, 2) == [[1], [1]]


def test_choose_passes_the_steps_layers():
    layered = scores([1.0, 2.0], [1.0, 2.0])
    assert choose(layered, {"method": "row_pruning", "ratio": 0.5, "layers": [0]}, 2) == [[1], [0, 1]]
    step = {"method": "row_pruning", "ratio": 0.5, "selection": "global", "layers": [1]}
    assert choose(layered, step, 2) == [[0, 1], [1]]


def test_choose_refuses_a_layer_beyond_the_model_naming_the_option():
    with pytest.raises(ValueError, match=r"row_pruning\.layers \[0, 2\] names a layer beyond the model's 2"):
        choose(scores([1.0], [1.0]), {"method": "row_pruning", "ratio": 0.5, "layers": [0, 2]}, 2)
    layered = scores([1.0, 2.0], [1.0, 2.0])
    assert choose(layered, {"method": "row_pruning", "ratio": 0.5, "layers": [1]}, 2) == [[0, 1], [1]]  # the last layer
    assert choose(layered, {"method": "row_pruning", "ratio": 0.5, "layers": []}, 2) == [[0, 1], [0, 1]]
    # an empty list names no layer, so it is never "beyond" even a one-layer model
    assert choose(scores([1.0, 2.0]), {"method": "row_pruning", "ratio": 0.5, "layers": []}, 1) == [[0, 1]]


# -------------------------------------------------------------------------------------- scoring
def test_random_scores_are_uniform_per_layer_and_reproducible_by_seed():
    first = random_scores([3, 0, 5], seed=7)
    assert [s.numel() for s in first] == [3, 0, 5]
    assert all(torch.equal(a, b) for a, b in zip(first, random_scores([3, 0, 5], seed=7)))
    assert not torch.equal(first[2], random_scores([3, 0, 5], seed=8)[2])
    assert all(((s >= 0) & (s < 1)).all() for s in first)


@pytest.fixture(scope="module")
def tiny_model(hubert_ckpt):
    base = load_base(hubert_ckpt)
    return SpeechTransformer.from_state_dict(base.config, base.state_dict)


def l1_marker(model: SpeechTransformer) -> list[torch.Tensor]:
    return [torch.full((2,), 42.0)]


def test_score_dispatches_by_criterion_with_l1_as_default(tiny_model):
    sizes = [layer.attention.num_heads for layer in tiny_model.layers]
    assert score(tiny_model, {}, "heads", l1_marker, sizes)[0].tolist() == [42.0, 42.0]
    assert score(tiny_model, {"criterion": "l1"}, "heads", l1_marker, sizes)[0].tolist() == [42.0, 42.0]
    for seed in (0, 5):
        step = {"criterion": "random"} if seed == 0 else {"criterion": "random", "seed": seed}  # default seed 0
        expected = random_scores(sizes, seed)
        assert all(torch.equal(a, b) for a, b in zip(score(tiny_model, step, "heads", l1_marker, sizes), expected))


def test_diagonal_criteria_score_by_diagonality_with_the_documented_defaults(tiny_model, long_audio_dir):
    diagonality = diagonality_scores(tiny_model, str(long_audio_dir), DEFAULT_BAND, 32, 8.0, 4, 0)
    last = score(tiny_model, {"criterion": "diagonal_last", "audio": str(long_audio_dir)}, "heads", l1_marker, [])
    first = score(tiny_model, {"criterion": "diagonal_first", "audio": str(long_audio_dir)}, "heads", l1_marker, [])
    assert all(torch.equal(a, d) for a, d in zip(last, diagonality))
    assert all(torch.equal(a, -d) for a, d in zip(first, diagonality))  # the most diagonal head goes first
    options = {"diagonal_band": 0, "max_utterances": 3, "max_seconds": 0.25, "batch_size": 2, "seed": 4}
    narrow = score(tiny_model, {"criterion": "diagonal_last", "audio": str(long_audio_dir), **options}, "heads",
                   l1_marker, [])
    expected = diagonality_scores(tiny_model, str(long_audio_dir), 0, 3, 0.25, 2, 4)
    assert all(torch.equal(a, d) for a, d in zip(narrow, expected))


@pytest.mark.parametrize("kind", ["heads", "units"])
def test_data_driven_criterion_scores_with_the_documented_defaults(tiny_model, long_audio_dir, kind):
    step = {"criterion": "data_driven", "audio": str(long_audio_dir)}
    expected = data_driven_scores(tiny_model, kind, str(long_audio_dir), 32, 8.0, 4, 4, 0)
    assert all(torch.equal(a, b) for a, b in zip(score(tiny_model, step, kind, l1_marker, []), expected))
    options = {"max_utterances": 3, "max_seconds": 0.25, "batch_size": 2, "projections": 1, "seed": 9}
    expected = data_driven_scores(tiny_model, kind, str(long_audio_dir), 3, 0.25, 2, 1, 9)
    got = score(tiny_model, {**step, **options}, kind, l1_marker, [])
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
