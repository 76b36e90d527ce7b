"""The upstream-compressed command line: compress, inspect, and recipe errors that name the field."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from upstream_compressed.cli import main


def write_recipe(tmp_path, data) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_compress_identity_then_inspect_json(tmp_path, hubert_ckpt, capsys):
    out = tmp_path / "d.safetensors"
    assert main(["compress", write_recipe(tmp_path, {"base": str(hubert_ckpt), "steps": []}), "-o", str(out)]) == 0
    assert "technique identity" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["technique"] == "identity"
    assert info["params"] == info["params_base"] > 0
    assert info["macs"] == info["macs_base"] > 0
    assert info["params_nonzero"] is None and info["macs_effective"] is None  # dense: nothing to discount
    assert len(info["structure"]["layers"]) == 2
    assert main(["inspect", str(out)]) == 0
    assert "params" in capsys.readouterr().out


def test_relative_base_path_resolves_against_the_recipe(tmp_path, hubert_ckpt):
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "b.pt").write_bytes(hubert_ckpt.read_bytes())
    recipe = write_recipe(tmp_path, {"base": "bases/b.pt", "steps": []})
    assert main(["compress", recipe, "-o", str(tmp_path / "d.safetensors")]) == 0


def test_base_option_replaces_the_recipes_base(tmp_path, hubert_ckpt, capsys, monkeypatch):
    recipe = write_recipe(tmp_path, {"base": "tiny_hubert_not_here", "steps": []})
    out = tmp_path / "d.safetensors"
    monkeypatch.chdir(hubert_ckpt.parent)  # a relative --base is taken from the current directory
    assert main(["compress", recipe, "--base", hubert_ckpt.name, "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["base"]["path"] == str(hubert_ckpt.resolve())


def test_a_missing_relative_audio_folder_names_the_recipes_folder(tmp_path, hubert_ckpt, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    step = {"method": "row_pruning", "ratio": 0.5, "recovery": {"audio": "data/no_such_corpus", "steps": 1}}
    recipe = write_recipe(tmp_path / "recipes", {"base": str(hubert_ckpt), "steps": [step]})
    assert main(["compress", recipe, "-o", str(tmp_path / "d.safetensors")]) == 2
    assert (f"steps[0].recovery.audio: folder {tmp_path}/recipes/data/no_such_corpus does not exist "
            f"(a relative path is relative to {tmp_path}/recipes, the folder of the file)") in capsys.readouterr().err


@pytest.mark.parametrize(
    "recipe,message",
    [
        ({"steps": []}, "`base` is missing"),
        ({"base": "x.pt", "steps": [{"method": "magic"}]}, r"steps\[0\]\.method: unknown method 'magic'"),
        ({"base": "x.pt", "steps": [{"ratio": 0.5}]}, r"steps\[0\]: each step needs a `method`"),
        ({"base": "x.pt", "stpes": []}, "unknown top-level field"),
        ({"base": "/no/such/base.pt", "steps": []}, "neither an existing file nor a known name"),
        ("base: [unclosed", "not valid YAML"),
    ],
)
def test_bad_recipes_are_refused_naming_the_field(tmp_path, capsys, recipe, message):
    out = tmp_path / "d.safetensors"
    assert main(["compress", write_recipe(tmp_path, recipe), "-o", str(out)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_console_script_help():
    result = subprocess.run(
        [sys.executable, "-m", "upstream_compressed.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "compress" in result.stdout and "inspect" in result.stdout
