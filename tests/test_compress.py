"""Structured compression: exact parameter counts, removing structure = zeroing it, small deltas."""

from __future__ import annotations

import pytest
import torch

from upstream_compressed.compress import run_recipe
from upstream_compressed.delta import apply_delta, write_delta
from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import load_base
from upstream_compressed.model.layers import effective_weight
from upstream_compressed.recipe import RecipeError, parse_recipe
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint

from helpers import max_valid_difference, run_model

HUBERT_BASE_CONV = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"


@pytest.fixture(scope="module")
def base_shaped(tmp_path_factory):
    """HuBERT Base's shape (12 x 768, FFN 3072, 12 heads) with random weights."""
    return make_hubert_checkpoint(
        tmp_path_factory.mktemp("base") / "hubert_base_shape.pt", layers=12, dim=768, ffn=3072, heads=12,
        conv_layers=HUBERT_BASE_CONV, conv_pos=128, conv_pos_groups=16,
    )


def compress(ckpt, *steps):
    return run_recipe(parse_recipe({"base": str(ckpt), "steps": list(steps)}))


def build(delta, ckpt) -> SpeechTransformer:
    return apply_delta(delta, load_base(ckpt)).eval()


# ----------------------------------------------------------------- exact analytic parameter counts
BASE_PARAMS = 94_370_944  # our encoder-and-front-end count for the HuBERT Base shape (no pre-training heads)
PER_HEAD = 3 * (768 * 64 + 64) + 64 * 768  # q/k/v rows with biases + out_proj columns
PER_UNIT = 768 + 1 + 768  # fc1 row + its bias + fc2 column


def low_rank_params(out_features: int, in_features: int, ratio: float) -> int:
    rank = int((1 - ratio) * out_features * in_features // (out_features + in_features))
    return rank * (out_features + in_features)


@pytest.mark.parametrize(
    "step,expected",
    [
        ({"method": "head_pruning", "ratio": 0.5}, BASE_PARAMS - 12 * 6 * PER_HEAD),
        ({"method": "head_pruning", "ratio": 0.5, "selection": "global"}, BASE_PARAMS - 72 * PER_HEAD),
        ({"method": "row_pruning", "ratio": 0.5}, BASE_PARAMS - 12 * 1536 * PER_UNIT),
        ({"method": "row_pruning", "ratio": 0.25, "criterion": "random", "selection": "global"},
         BASE_PARAMS - 9216 * PER_UNIT),
        ({"method": "low_rank", "ratio": 0.5, "targets": ["ffn"]},
         BASE_PARAMS - 12 * 2 * (768 * 3072 - low_rank_params(3072, 768, 0.5))),
    ],
    ids=["heads-per-layer", "heads-global", "rows-per-layer", "rows-random-global", "low-rank-ffn"],
)
def test_parameter_count_is_the_analytic_one(base_shaped, step, expected):
    delta = compress(base_shaped, step)
    assert delta.manifest["params"]["base"] == BASE_PARAMS
    assert delta.manifest["params"]["compressed"] == expected
    assert build(delta, base_shaped).num_parameters() == expected


def test_low_rank_attention_half_parameters(base_shaped):
    delta = compress(base_shaped, {"method": "low_rank", "ratio": 0.5, "targets": ["attention"], "layers": [0, 5]})
    assert delta.manifest["params"]["compressed"] == BASE_PARAMS - 2 * 4 * (768 * 768 - low_rank_params(768, 768, 0.5))
    assert delta.manifest["config"]["layers"][5]["ranks"] == {n: 192 for n in ("q_proj", "k_proj", "v_proj", "out_proj")}


def test_head_pruned_delta_is_tiny_and_stores_only_indices(tmp_path, base_shaped):
    delta = compress(base_shaped, {"method": "head_pruning", "ratio": 0.5, "criterion": "l1"})
    assert delta.tensors == {}
    path = write_delta(delta, tmp_path / "heads.safetensors")
    assert path.stat().st_size < 0.01 * base_shaped.stat().st_size
    assert all(len(layer["kept_heads"]) == 6 for layer in delta.manifest["structure"]["layers"])


# ------------------------------------------------------- removing structure equals zeroing it
def dense_model(ckpt) -> SpeechTransformer:
    converted = load_base(ckpt)
    model = SpeechTransformer(converted.config)
    model.load_state_dict(converted.state_dict)
    return model.eval()


@pytest.mark.parametrize("criterion,selection", [("l1", "per_layer"), ("random", "global"), ("data_driven", "global")])
def test_head_pruning_equals_zeroed_heads(hubert_ckpt, padded_batch, audio_dir, criterion, selection):
    step = {"method": "head_pruning", "ratio": 0.5, "criterion": criterion, "selection": selection,
            "audio": str(audio_dir)}
    if criterion != "data_driven":
        step.pop("audio")
    delta = compress(hubert_ckpt, step)
    masked = dense_model(hubert_ckpt)
    head_dim = masked.config.head_dim
    with torch.no_grad():
        for i, origin in enumerate(delta.manifest["structure"]["layers"]):
            kept = origin["kept_heads"] if origin["kept_heads"] is not None else range(masked.config.layers[i].num_heads)
            for head in set(range(masked.config.layers[i].num_heads)) - set(kept):
                masked.layers[i].attention.out_proj.weight[:, head * head_dim:(head + 1) * head_dim] = 0
    expected, mask = run_model(masked, padded_batch)
    states, _ = run_model(build(delta, hubert_ckpt), padded_batch)
    assert sum(layer["num_heads"] for layer in delta.manifest["config"]["layers"]) == 4
    for a, b in zip(states, expected):
        assert max_valid_difference(a, b, mask) < 1e-5


@pytest.mark.parametrize("criterion", ["l1", "data_driven"])
def test_row_pruning_equals_zeroed_units(hubert_ckpt, padded_batch, audio_dir, criterion):
    step = {"method": "row_pruning", "ratio": 0.75, "criterion": criterion}
    if criterion == "data_driven":
        step["audio"] = str(audio_dir)
    delta = compress(hubert_ckpt, step)
    masked = dense_model(hubert_ckpt)
    with torch.no_grad():
        for i, origin in enumerate(delta.manifest["structure"]["layers"]):
            dropped = sorted(set(range(128)) - set(origin["kept_units"]))
            masked.layers[i].feed_forward.fc2.weight[:, dropped] = 0
    expected, mask = run_model(masked, padded_batch)
    states, _ = run_model(build(delta, hubert_ckpt), padded_batch)
    assert [layer["ffn_dim"] for layer in delta.manifest["config"]["layers"]] == [32, 32]
    for a, b in zip(states, expected):
        assert max_valid_difference(a, b, mask) < 1e-5


def test_low_rank_equals_truncated_svd_weights(distiller_ckpt, padded_batch):
    delta = compress(distiller_ckpt, {"method": "low_rank", "ratio": 0.6})
    model = build(delta, distiller_ckpt)
    dense = dense_model(distiller_ckpt)
    with torch.no_grad():  # zero the small singular values of every dense weight
        for i in range(dense.config.num_layers):
            for name, rank in delta.manifest["config"]["layers"][i]["ranks"].items():
                linear = dense.linear(i, name)
                u, s, vh = torch.linalg.svd(linear.weight, full_matrices=False)
                s[rank:] = 0
                linear.weight.copy_(u @ torch.diag(s) @ vh)
                assert torch.allclose(effective_weight(model.linear(i, name)), linear.weight, atol=1e-5)
    expected, mask = run_model(dense, padded_batch)
    states, _ = run_model(model, padded_batch)
    for a, b in zip(states, expected):
        assert max_valid_difference(a, b, mask) < 1e-4


def test_low_rank_never_factorises_without_saving(hubert_ckpt):
    delta = compress(hubert_ckpt, {"method": "low_rank", "energy": 1.0})  # full energy: full rank, no saving
    assert all(layer["ranks"] == {} for layer in delta.manifest["config"]["layers"])
    assert delta.manifest["params"]["compressed"] == delta.manifest["params"]["base"]


def test_combined_recipe_composes(hubert_ckpt, padded_batch):
    delta = compress(
        hubert_ckpt,
        {"method": "head_pruning", "ratio": 0.25},
        {"method": "row_pruning", "ratio": 0.5},
        {"method": "head_pruning", "ratio": 0.5, "criterion": "random"},
        {"method": "low_rank", "ratio": 0.3, "targets": ["fc1"]},
    )
    assert delta.technique == "head_row_head_lr"
    model = build(delta, hubert_ckpt)
    assert [layer.num_heads for layer in model.config.layers] == [2, 2]
    states, _ = run_model(model, padded_batch)
    assert all(torch.isfinite(s).all() for s in states)


# ---------------------------------------------------------------------- recipe validation
@pytest.mark.parametrize(
    "step,message",
    [
        ({"method": "head_pruning"}, r"steps\[0\]\.ratio is missing"),
        ({"method": "head_pruning", "ratio": 1.0}, r"steps\[0\]\.ratio: 1\.0 is outside .*every head of every layer"),
        ({"method": "head_pruning", "ratio": 0.5, "criterion": "magic"}, r"steps\[0\]\.criterion"),
        ({"method": "head_pruning", "ratio": 0.5, "criterion": "data_driven"}, r"steps\[0\]\.audio"),
        ({"method": "row_pruning", "ratio": -0.1}, r"steps\[0\]\.ratio: -0\.1 is outside"),
        ({"method": "row_pruning", "ratio": 0.5, "selection": "everywhere"}, r"steps\[0\]\.selection"),
        ({"method": "low_rank", "ratio": 0.5, "energy": 0.9}, "exactly one of"),
        ({"method": "low_rank", "ratio": 0.5, "targets": ["conv"]}, r"steps\[0\]\.targets: unknown target 'conv'"),
        ({"method": "low_rank", "ratio": 0.5, "rnak": 3}, r"unknown option\(s\) \['rnak'\]"),
    ],
)
def test_bad_steps_are_refused_before_any_work(step, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"base": "/does/not/matter.pt", "steps": [step]})


# ---------------------------------------------------------------------- recovery training
def distance_to_teacher(model, teacher, wavs) -> float:
    from upstream_compressed.train.distill import distillation_loss

    student_states, mask = run_model(model, wavs)
    teacher_states, _ = run_model(teacher, wavs)
    pairs = [[i, i] for i in range(len(student_states))]
    return float(distillation_loss(student_states, teacher_states, pairs, mask, 1.0))


def test_recovery_training_brings_the_pruned_model_back_towards_the_base(tmp_path, hubert_ckpt, audio_dir):
    from upstream_compressed.audio import list_audio, load_audio

    prune = {"method": "head_pruning", "ratio": 0.5, "criterion": "random", "seed": 1}
    recovery = {"audio": str(audio_dir), "steps": 12, "batch_size": 2, "max_seconds": 1.0, "lr": 2e-3,
                "checkpoint_every": 4, "device": "cpu"}
    plain = compress(hubert_ckpt, prune)
    work = tmp_path / "work"
    recovered = run_recipe(parse_recipe({"base": str(hubert_ckpt), "steps": [{**prune, "recovery": recovery}]}),
                           work_dir=work)
    assert recovered.manifest["structure"] == plain.manifest["structure"]
    assert recovered.tensors, "recovery changes weights, which the delta must store"
    assert "feature_extractor.convs.0.weight" in recovered.tensors  # trained end to end unless frozen
    assert (work / "after-step-0.pt").is_file()

    wavs = [load_audio(f, 1.0) for f in list_audio(audio_dir)]
    teacher = dense_model(hubert_ckpt)
    before = distance_to_teacher(build(plain, hubert_ckpt), teacher, wavs)
    after = distance_to_teacher(build(recovered, hubert_ckpt), teacher, wavs)
    assert after < 0.97 * before  # 12 steps of a tiny random model: a modest but real recovery

    # Running the same recipe again resumes from the snapshot instead of training again.
    again = run_recipe(parse_recipe({"base": str(hubert_ckpt), "steps": [{**prune, "recovery": recovery}]}),
                       work_dir=work)
    assert again.manifest["tensors_sha256"] == recovered.manifest["tensors_sha256"]


@pytest.mark.parametrize(
    "recovery,message",
    [
        ({"steps": 3}, r"recovery: expected a mapping with at least `audio: DIR`"),
        ({"audio": "x", "stesp": 3}, r"recovery: unknown training option"),
        ({"audio": "x", "steps": 0}, r"recovery\.steps: expected a positive integer"),
        ({"audio": "x", "lr": -1}, r"recovery\.lr"),
    ],
)
def test_bad_recovery_options_are_refused(recovery, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"base": "x.pt", "steps": [{"method": "row_pruning", "ratio": 0.5, "recovery": recovery}]})
