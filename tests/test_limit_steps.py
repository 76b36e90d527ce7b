"""`compress --limit-steps N`: every training loop of a recipe cut to N steps, and the delta says so."""

from __future__ import annotations

import re

import yaml

from upstream_compressed.cli import main
from upstream_compressed.compress import limit_training_steps
from upstream_compressed.delta import read_delta
from upstream_compressed.recipe import parse_recipe

DONE = re.compile(r"^training: (.+?) done steps=(\d+) ", re.M)


def _recipe(tmp_path, base, audio_dir) -> str:
    train = {"audio": str(audio_dir), "batch_size": 2, "max_seconds": 0.5, "device": "cpu"}
    data = {"base": str(base), "steps": [
        {"method": "distillation", "student_layers": 1, "steps": 40, **train},
        {"method": "head_pruning", "ratio": 0.5, "criterion": "l1", "recovery": {**train, "steps": 30}},
        {"method": "low_rank", "ratio": 0.25, "targets": ["ffn"], "recovery": dict(train)},  # default 200 steps
    ]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_every_training_loop_stops_at_the_limit_and_the_manifest_records_it(tmp_path, hubert_ckpt, audio_dir, capfd):
    out = tmp_path / "smoke.safetensors"
    assert main(["compress", _recipe(tmp_path, hubert_ckpt, audio_dir), "-o", str(out), "--limit-steps", "2"]) == 0
    loops = DONE.findall(capfd.readouterr().err)
    assert [(what, int(steps)) for what, steps in loops] == [
        ("step 0 distillation", 2), ("step 1 recovery", 2), ("step 2 recovery", 2)]
    steps = read_delta(out).manifest["recipe"]["steps"]
    assert [steps[0]["steps"], steps[1]["recovery"]["steps"], steps[2]["recovery"]["steps"]] == [2, 2, 2]


def test_a_limit_above_a_loop_leaves_it_alone(tmp_path, hubert_ckpt, audio_dir):
    recipe = parse_recipe(yaml.safe_load(open(_recipe(tmp_path, hubert_ckpt, audio_dir))))
    limited = limit_training_steps(recipe, 35)
    assert [limited.steps[0]["steps"], limited.steps[1]["recovery"]["steps"], limited.steps[2]["recovery"]["steps"]] \
        == [35, 30, 35]
    assert recipe.steps[0]["steps"] == 40, "the recipe given is not changed"


def test_limit_steps_must_be_positive(tmp_path, hubert_ckpt, audio_dir, capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["compress", _recipe(tmp_path, hubert_ckpt, audio_dir), "-o", str(tmp_path / "x"), "--limit-steps", "0"])
    assert "expected a positive integer" in capsys.readouterr().err
