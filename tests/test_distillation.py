"""Distillation as a recipe step: DistilHuBERT-style students, the kd -> head -> low-rank combination."""

from __future__ import annotations

import pytest
import torch

from upstream_compressed.compress import run_recipe
from upstream_compressed.compress.distillation import default_pred_layers
from upstream_compressed.delta import write_delta
from upstream_compressed.recipe import RecipeError, parse_recipe
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_hubert_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.pt", layers=4)


def kd_step(audio_dir, **extra):
    return {"method": "distillation", "student_layers": 2, "audio": str(audio_dir), "steps": 4, "batch_size": 2,
            "max_seconds": 1.0, "lr": 1e-3, "device": "cpu", **extra}


def test_distilled_student_is_a_delta_and_a_registered_upstream(tmp_path, teacher, audio_dir, s3prl_hub, padded_batch):
    delta = run_recipe(parse_recipe({"base": str(teacher), "steps": [kd_step(audio_dir, freeze_front_end=True)]}))
    assert delta.technique == "kd"
    config = delta.manifest["config"]
    assert len(config["layers"]) == 2 and config["pred_layer_id"] == default_pred_layers(4) == [1, 3, 4]
    assert [layer["source_layer"] for layer in delta.manifest["structure"]["layers"]] == [0, 1]
    assert "prediction_heads.weight" in delta.tensors
    assert not any(name.startswith("feature_extractor.") for name in delta.tensors), "frozen: copied, not stored"
    assert delta.manifest["params"]["compressed"] < delta.manifest["params"]["base"]

    path = write_delta(delta, tmp_path / "kd.safetensors")
    upstream = s3prl_hub.hubert_kd(ckpt=str(path))
    with torch.no_grad():
        states = upstream(padded_batch)["hidden_states"]
    assert len(states) == 1 + 2 + 3  # input, two layers, three prediction heads
    assert len({tuple(s.shape) for s in states}) == 1


def test_kd_then_head_pruning_then_low_rank(tmp_path, teacher, audio_dir, s3prl_hub, padded_batch):
    steps = [
        kd_step(audio_dir),
        {"method": "head_pruning", "ratio": 0.5, "recovery": {"audio": str(audio_dir), "steps": 2, "batch_size": 2,
                                                               "max_seconds": 1.0, "device": "cpu"}},
        {"method": "low_rank", "ratio": 0.5, "targets": ["ffn"]},
    ]
    work = tmp_path / "work"
    delta = run_recipe(parse_recipe({"base": str(teacher), "steps": steps}), work_dir=work)
    assert delta.technique == "kd_head_lr"
    assert [layer["num_heads"] for layer in delta.manifest["config"]["layers"]] == [2, 2]
    assert all(layer["ranks"] for layer in delta.manifest["config"]["layers"])
    assert (work / "after-step-0.pt").is_file() and (work / "after-step-1.pt").is_file()
    path = write_delta(delta, tmp_path / "kd_head_lr.safetensors")
    with torch.no_grad():
        states = s3prl_hub.hubert_kd_head_lr(ckpt=str(path))(padded_batch)["hidden_states"]
    assert all(torch.isfinite(s).all() for s in states)


def test_layer_to_layer_variant(teacher, audio_dir):
    delta = run_recipe(parse_recipe({"base": str(teacher), "steps": [kd_step(audio_dir, variant="layer_to_layer")]}))
    assert delta.manifest["config"]["pred_layer_id"] == []
    assert len(delta.manifest["config"]["layers"]) == 2


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"student_layers": 0}, r"student_layers: expected a positive integer"),
        ({"pred_layers": [0, 4]}, r"pred_layers"),
        ({"variant": "logits"}, r"variant"),
        ({"steps": -1}, r"steps\[0\]\.steps: expected a positive integer"),
        ({"recovery": {"audio": "x"}}, r"distillation step trains already"),
    ],
)
def test_bad_distillation_steps_are_refused(audio_dir, extra, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"base": "t.pt", "steps": [kd_step(audio_dir, **extra)]})
