"""Every bundled recipe is valid and found by name; the tiny ones run on a tiny base, reading ${CORPUS}."""

import shutil
from pathlib import Path

import pytest

from helpers import shrink_recipe_steps
from upstream_compressed.bundled import RECIPES as BUNDLED_RECIPES
from upstream_compressed.compress import run_recipe
from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import load_base
from upstream_compressed.recipe import load_recipe, parse_recipe, technique_name
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint

RECIPES = sorted(p for p in BUNDLED_RECIPES.rglob("*.yaml") if p.name != "plan.yaml")  # plan: test_experiments
TINY = sorted(p for p in (BUNDLED_RECIPES / "tiny").glob("*.yaml") if p.name != "plan.yaml")
TINY_AUDIO = "LibriSpeech/train-clean-100"  # below ${CORPUS}, the make-corpus folder
# recipe -> the technique (upstream hubert_<technique>) it must produce
TINY_TECHNIQUES = {
    "kd": "kd", "kd_logits": "kd", "kd_head_lr": "kd_head_lr",
    "heads50_l1": "headpruned", "heads50_data_driven": "headpruned", "heads50_random": "headpruned",
    "heads50_l1_norecovery": "headpruned", "heads50_data_driven_norecovery": "headpruned",
    "heads50_random_norecovery": "headpruned", "heads50_diagonal_first": "headpruned",
    "heads50_diagonal_last": "headpruned", "heads25_data_driven": "headpruned", "heads75_data_driven": "headpruned",
    "heads50_random_seed1_norecovery": "headpruned", "heads50_random_seed2_norecovery": "headpruned",
    "heads75_l1_norecovery": "headpruned", "heads75_data_driven_norecovery": "headpruned",
    "heads75_random_norecovery": "headpruned", "rows25_l1_norecovery": "rowpruned",
    "rows25_data_driven_norecovery": "rowpruned",
    "rows25": "rowpruned", "rows50": "rowpruned", "rows75": "rowpruned",
    "lowrank25": "lowrank", "lowrank50": "lowrank", "lowrank75": "lowrank",
    "wp50": "weightpruned", "wp70": "weightpruned", "wp90": "weightpruned",
    "conv50": "convpruned", "joint_params": "jointpruned",
}
FULL = {"heads50", "rows50", "lowrank50", "kd", "kd_head_lr", "dphubert", "dphubert_macs"}


def test_the_shipped_sets_are_complete():
    assert {p.stem for p in TINY} == set(TINY_TECHNIQUES)
    assert {p.stem for p in (BUNDLED_RECIPES / "full").glob("*.yaml")} == FULL


@pytest.fixture
def data_variables(tmp_path, monkeypatch):
    """CORPUS (tiny, quick) and LIBRISPEECH (full) set to folders holding what the recipes read."""
    for folder in ("corpus/LibriSpeech/train-clean-100", "librispeech/train-clean-100", "librispeech/dev-clean"):
        (tmp_path / folder).mkdir(parents=True)
    monkeypatch.setenv("CORPUS", str(tmp_path / "corpus"))
    monkeypatch.setenv("LIBRISPEECH", str(tmp_path / "librispeech"))
    return tmp_path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_recipe_is_valid_and_found_by_name(path, data_variables):
    recipe = load_recipe(f"{path.parent.name}/{path.stem}")  # the bundled name, from any folder
    assert recipe.source == path and recipe.steps
    audio = {s.get("audio") for s in recipe.steps} | {s.get("recovery", {}).get("audio") for s in recipe.steps}
    assert all(Path(a).is_dir() for a in audio - {None})  # resolved to the folders the variables name
    if path.parent.name == "tiny":
        assert recipe.base == "tiny_hubert"
        assert technique_name(recipe.steps) == TINY_TECHNIQUES[path.stem]
        assert audio - {None} <= {str(data_variables / "corpus" / TINY_AUDIO)}  # some read no audio


@pytest.fixture(scope="module")
def corpus_folder(tmp_path_factory, audio_dir):
    """A folder laid out like a make-corpus folder as far as the tiny recipes read it."""
    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(audio_dir, root / TINY_AUDIO)
    return root


@pytest.fixture(scope="module")
def four_layer_base(tmp_path_factory):
    return make_hubert_checkpoint(tmp_path_factory.mktemp("base") / "base.pt", layers=4)


BUNDLED_TINY_PARAMS = 3_718_976  # the bundled tiny HuBERT as an upstream counts it (docs/study.md)


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_tiny_recipe_runs_on_the_corpus_that_CORPUS_names(path, corpus_folder, four_layer_base, monkeypatch):
    """Each tiny recipe, with its base replaced by a 4-layer test checkpoint and its training cut to a step."""
    monkeypatch.setenv("CORPUS", str(corpus_folder))
    recipe = load_recipe(path, base=str(four_layer_base))
    base = load_base(four_layer_base)
    four_layer_base_params = SpeechTransformer.from_state_dict(base.config, base.state_dict).num_parameters()
    steps = shrink_recipe_steps(recipe.steps, steps=1, batch_size=2, max_seconds=1.0, max_utterances=4)
    for step in steps:  # a size target is in the bundled model's parameters: scale it to this smaller base
        if "target_params" in step:
            step["target_params"] = round(step["target_params"] / BUNDLED_TINY_PARAMS * four_layer_base_params)
        if "final_distillation" in step:
            step["final_distillation"] = shrink_recipe_steps([step["final_distillation"]], steps=1, batch_size=2,
                                                             max_seconds=1.0)[0]
    delta = run_recipe(parse_recipe({"base": recipe.base, "steps": steps}))
    assert delta.technique == TINY_TECHNIQUES[path.stem]
    assert delta.manifest["params"]["compressed"] <= delta.manifest["params"]["base"]


def test_kd_head_lr_ends_at_about_the_size_of_kd(tmp_path, corpus_folder, monkeypatch):
    """On the bundled tiny HuBERT's shape (4 layers, 256 dims, 4 heads, FFN 1024), as the recipes state."""
    base = make_hubert_checkpoint(tmp_path / "tiny_shape.pt", layers=4, dim=256, ffn=1024, heads=4,
                                  conv_layers="[(64,10,5)] + [(64,3,2)] * 4 + [(128,2,2)] * 2",
                                  conv_pos=64, conv_pos_groups=16)
    monkeypatch.setenv("CORPUS", str(corpus_folder))
    params = {}
    for name in ("kd", "kd_head_lr"):
        recipe = load_recipe(f"tiny/{name}", base=str(base))
        steps = shrink_recipe_steps(recipe.steps, steps=1, batch_size=1, max_seconds=0.5, max_utterances=2)
        params[name] = run_recipe(parse_recipe({"base": recipe.base, "steps": steps})).manifest["params"]
    kd, combined = params["kd"]["compressed"], params["kd_head_lr"]["compressed"]
    assert abs(combined - kd) < 0.01 * kd
    assert kd < 0.65 * params["kd"]["base"]
