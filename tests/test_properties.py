"""Bad inputs tried at random: valid recipes, plans and ``-g`` options files, one field spoiled at a time.

Every spoiled value is invalid by construction (a wrong type, an out-of-range number, an unknown
key, a missing file), so every one must end in the project's own error (RecipeError, PlanError,
DeltaError) naming the field, never in another exception. Only validation runs: nothing is compressed.
Hypothesis runs are bounded and derandomised, so CI sees the same examples every time.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upstream_compressed.delta import DeltaError
from upstream_compressed.experiments import PlanError, load_plan
from upstream_compressed.recipe import RecipeError, load_recipe, parse_recipe

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.filter_too_much])

# ----------------------------------------------------------------------------- spoiled values
TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=8)
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), TEXT,
    st.lists(st.one_of(st.integers(-3, 30), TEXT, st.booleans()), max_size=3),
    st.dictionaries(st.sampled_from(["a", "method", "audio"]), st.integers(), max_size=2),
)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


# What each kind of field accepts; the spoiled values are drawn from everything else.
ACCEPTS: dict[str, Callable[[Any], bool]] = {
    "fraction": lambda v: _number(v) and 0 < v < 1,
    "pruning_ratio": lambda v: _number(v) and 0 <= v < 1,
    "positive_int": lambda v: _integer(v) and v > 0,
    "optional_count": lambda v: v is None or (_integer(v) and v >= 0),
    "integer": _integer,
    "positive": lambda v: _number(v) and v > 0,
    "non_negative": lambda v: _number(v) and v >= 0,
    "bool": lambda v: isinstance(v, bool),
    "layers": lambda v: v is None or (isinstance(v, list) and all(_integer(i) and i >= 0 for i in v)),
    "pred_layers": lambda v: v is None or (isinstance(v, list) and bool(v) and all(_integer(i) and i > 0 for i in v)),
    "targets": lambda v: isinstance(v, list) and bool(v) and all(v_ in ("attention", "ffn", "q_proj", "k_proj",
                                                                         "v_proj", "out_proj", "fc1", "fc2")
                                                                  for v_ in v),
    "pairs": lambda v: v is None or (isinstance(v, list) and bool(v) and all(
        isinstance(p, list) and len(p) == 2 and all(_integer(i) and i >= 0 for i in p) for p in v)),
    "path": _text,
    "device": lambda v: v in ("auto", "cpu", "cuda") or (isinstance(v, str) and v.startswith("cuda:")),
    "mapping": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
}
CHOICES = {
    "head_criterion": ("l1", "data_driven", "random", "diagonal_first", "diagonal_last"),
    "unit_criterion": ("l1", "data_driven", "random"),
    "pruning_selection": ("per_layer", "global"),
    "wp_selection": ("global", "per_layer"),
    "variant": ("heads", "layer_to_layer"),
    "objective": ("hidden_states",),  # cluster_kl is valid too but changes which options apply: never drawn
    "method": ("distillation", "head_pruning", "row_pruning", "low_rank", "weight_pruning"),
}
OUT_OF_RANGE = st.one_of(st.floats(-1e6, -1e-9), st.floats(1.0, 1e6), st.integers(-1000, 0),
                         st.sampled_from([math.nan, math.inf, -math.inf]))


def spoiled(kind: str) -> st.SearchStrategy:
    """Values a field of ``kind`` must refuse: junk of other types, and numbers just outside its range."""
    if kind in CHOICES:
        accepts: Callable[[Any], bool] = lambda v: isinstance(v, str) and v in CHOICES[kind]  # noqa: E731
        if kind == "objective":
            accepts = lambda v: isinstance(v, str) and v in ("hidden_states", "cluster_kl", "temporal_relation")  # noqa: E731
    else:
        accepts = ACCEPTS[kind]
    return st.one_of(JUNK, OUT_OF_RANGE).filter(lambda v: not accepts(v))


def unknown_key(known: set[str]) -> st.SearchStrategy:
    return st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True).filter(lambda k: k not in known)


# ----------------------------------------------------------------------------------- recipes
TRAINING_FIELDS = {
    "steps": "positive_int", "batch_size": "positive_int", "grad_accumulation": "positive_int",
    "checkpoint_every": "positive_int", "warmup_steps": "optional_count", "lr": "positive", "max_seconds": "positive",
    "clip_norm": "positive", "weight_decay": "non_negative", "cosine_weight": "non_negative", "seed": "integer",
    "freeze_front_end": "bool", "amp": "bool", "device": "device", "pairs": "pairs", "audio": "path",
    "objective": "objective",
}
DATA_FIELDS = {"max_utterances": "positive_int", "max_seconds": "positive", "batch_size": "positive_int",
               "projections": "positive_int", "seed": "integer", "audio": "path", "layers": "layers"}
STEP_FIELDS = {
    "head_pruning": {"ratio": "pruning_ratio", "criterion": "head_criterion", "selection": "pruning_selection",
                     **DATA_FIELDS},
    "row_pruning": {"ratio": "pruning_ratio", "criterion": "unit_criterion", "selection": "pruning_selection",
                    **DATA_FIELDS},
    "low_rank": {"ratio": "fraction", "targets": "targets", "layers": "layers"},
    "weight_pruning": {"sparsity": "fraction", "selection": "wp_selection", "targets": "targets", "layers": "layers"},
    "distillation": {"student_layers": "positive_int", "pred_layers": "pred_layers", "variant": "variant",
                     **TRAINING_FIELDS},
}


# Options with rules of their own (they change what other options mean): never drawn as unknown keys.
OTHER_STEP_OPTIONS = {"method", "recovery", "pattern", "energy", "diagonal_band", "logit_temperature"}


def valid_recipe(audio: str) -> dict[str, Any]:
    """Every method once, each field that the schema above spoils set to a valid value."""
    training = {"audio": audio, "steps": 10, "batch_size": 2, "grad_accumulation": 1, "checkpoint_every": 5,
                "warmup_steps": 2, "lr": 1e-4, "max_seconds": 1.0, "clip_norm": 5.0, "weight_decay": 0.0,
                "cosine_weight": 1.0, "seed": 0, "freeze_front_end": True, "amp": False, "device": "cpu",
                "objective": "hidden_states"}
    data = {"audio": audio, "max_utterances": 4, "max_seconds": 2.0, "batch_size": 2, "projections": 2, "seed": 1,
            "layers": [0]}
    return {"base": "tiny_hubert", "steps": [
        {"method": "distillation", "student_layers": 2, "pred_layers": [1, 2], "variant": "heads", **training},
        {"method": "head_pruning", "ratio": 0.5, "criterion": "data_driven", "selection": "global", **data,
         "recovery": {**training, "pairs": [[0, 0], [1, 1]]}},
        {"method": "row_pruning", "ratio": 0.25, "criterion": "l1", "selection": "per_layer", **data},
        {"method": "low_rank", "ratio": 0.5, "targets": ["ffn", "q_proj"], "layers": [1]},
        {"method": "weight_pruning", "sparsity": 0.7, "selection": "per_layer", "targets": ["attention"],
         "layers": [0, 1]},
    ]}


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("audio")
    (folder / "a.wav").write_bytes(b"")  # never read: only validation runs
    return str(folder)


def test_the_unspoiled_recipe_is_valid(audio_folder):
    parse_recipe(valid_recipe(audio_folder))


@st.composite
def spoiled_recipes(draw, audio: str) -> tuple[dict[str, Any], str]:
    """A valid recipe with one thing wrong, and the name the error must give."""
    recipe = valid_recipe(audio)
    where = draw(st.sampled_from(["top", "step", "recovery", "unknown_step_key", "unknown_top_key", "whole_step"]))
    if where == "top":
        field = draw(st.sampled_from(["base", "steps"]))
        recipe[field] = draw(spoiled("path" if field == "base" else "list").filter(lambda v: v is not None))
        return recipe, field
    if where == "unknown_top_key":
        key = draw(unknown_key({"base", "steps", "mean_std"}))
        recipe[key] = draw(JUNK)
        return recipe, key
    # A distillation step (index 0) trains already: it takes no recovery.
    index = draw(st.integers(1 if where == "recovery" else 0, len(recipe["steps"]) - 1))
    step = recipe["steps"][index]
    if where == "whole_step":
        recipe["steps"][index] = draw(JUNK.filter(lambda v: not isinstance(v, dict) or "method" not in v))
        return recipe, f"steps[{index}]"
    if where == "unknown_step_key":
        key = draw(unknown_key(set(STEP_FIELDS[step["method"]]) | set(TRAINING_FIELDS) | OTHER_STEP_OPTIONS))
        step[key] = draw(JUNK)
        return recipe, key
    if where == "recovery":
        if "recovery" not in step:
            step["recovery"] = {"audio": audio}
        field = draw(st.sampled_from(sorted(TRAINING_FIELDS)))
        step["recovery"][field] = draw(spoiled(TRAINING_FIELDS[field]))
        return recipe, f"steps[{index}].recovery" + ("" if field == "audio" else f".{field}")
    field = draw(st.sampled_from(sorted(STEP_FIELDS[step["method"]]) + ["method"]))
    step[field] = draw(spoiled("method" if field == "method" else STEP_FIELDS[step["method"]][field]))
    return recipe, f"steps[{index}].{field}" if field not in ("audio",) else f"steps[{index}]"


@SETTINGS
@given(data=st.data())
def test_a_spoiled_recipe_is_refused_naming_the_field(audio_folder, data):
    recipe, field = data.draw(spoiled_recipes(audio_folder))
    with pytest.raises(RecipeError) as error:
        parse_recipe(copy.deepcopy(recipe), "r.yaml")
    assert field in str(error.value)


@SETTINGS
@given(data=st.data())
def test_a_recipe_file_naming_a_missing_file_or_folder_is_refused_naming_the_field(audio_folder, tmp_path_factory,
                                                                                    data):
    recipe = valid_recipe(audio_folder)
    missing = str(Path(audio_folder) / "missing" / data.draw(st.from_regex(r"[a-z]{1,8}", fullmatch=True)))
    choice = data.draw(st.sampled_from(["base", "mean_std", "audio", "recovery_audio", "audio_is_a_file"]))
    if choice in ("base", "mean_std"):
        recipe[choice], field = missing + ".pt", choice
    elif choice == "audio":
        recipe["steps"][2]["audio"], field = missing, "steps[2].audio"
    elif choice == "recovery_audio":
        recipe["steps"][1]["recovery"]["audio"], field = missing, "steps[1].recovery.audio"
    else:
        recipe["steps"][0]["audio"], field = str(Path(audio_folder) / "a.wav"), "steps[0].audio"
    path = tmp_path_factory.getbasetemp() / "spoiled_recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert field in str(error.value)


# -------------------------------------------------------------------------------------- plans
PLAN_FIELDS = {"corpus": "path", "base": "path", "pr_config": "path", "sid_config": "path", "models": "list",
               "data": "mapping", "override_base": "bool"}
MODEL_FIELDS = {"name": "path", "method": "path", "rate": "non_negative", "upstream": "path", "recipe": "path",
                "ckpt": "path", "downstream_lr": "positive"}


def valid_plan(ckpt: str) -> dict[str, Any]:
    return {"corpus": "./corpus", "base": "tiny_hubert", "pr_config": "ctc_libriphone_tiny",
            "sid_config": "voxceleb1_tiny", "override_base": False, "data": {"lexicon": "lexicon.txt"},
            "models": [
                {"name": "base", "method": "base", "upstream": "hubert_local", "rate": 0.0},
                {"name": "heads50", "method": "head_pruning", "rate": 0.5, "recipe": "tiny/heads50_l1",
                 "downstream_lr": 1e-3},
                {"name": "mine", "method": "checkpoint", "upstream": "hubert_local", "ckpt": ckpt},
            ]}


@pytest.fixture(scope="module")
def plan_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plan")
    (folder / "model.pt").write_bytes(b"")
    return folder


def load_plan_data(folder: Path, plan: Any):
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return load_plan(path)


def test_the_unspoiled_plan_is_valid(plan_folder):
    assert len(load_plan_data(plan_folder, valid_plan(str(plan_folder / "model.pt"))).models) == 3


# A plan field that may be absent accepts null too (it then takes its default).
NULL_OK = {"data", "override_base", "models"}


@st.composite
def spoiled_plans(draw, ckpt: str) -> tuple[dict[str, Any], str]:
    plan = valid_plan(ckpt)
    where = draw(st.sampled_from(["top", "model", "unknown_top_key", "unknown_model_key", "data_key", "missing"]))
    if where == "top":
        field = draw(st.sampled_from(sorted(PLAN_FIELDS)))
        plan[field] = draw(spoiled(PLAN_FIELDS[field]).filter(lambda v: not (v is None and field in NULL_OK)
                                                              and not (field == "models" and v == {})))
        return plan, field
    if where == "unknown_top_key":
        key = draw(unknown_key(set(PLAN_FIELDS)))
        plan[key] = draw(JUNK)
        return plan, key
    index = draw(st.integers(0, 2))
    entry = plan["models"][index]
    if where == "unknown_model_key":
        key = draw(unknown_key(set(MODEL_FIELDS)))
        entry[key] = draw(JUNK)
        return plan, key
    if where == "data_key":
        plan["data"][draw(unknown_key({"librispeech", "lexicon", "vocab", "voxceleb1", "voxceleb1_split"}))] = "x"
        return plan, "data"
    if where == "missing":
        field = {0: "pr_config", 1: "recipe", 2: "ckpt"}[index]
        missing = "no_such_" + draw(st.from_regex(r"[a-z]{1,8}", fullmatch=True)) + ".yaml"
        if field == "pr_config":
            plan[field] = missing
        else:
            entry[field] = missing
        return plan, field
    # A field that entry uses (null is allowed where the field is optional for that method).
    used = {0: ["name", "method", "rate", "upstream", "downstream_lr"], 1: ["name", "rate", "recipe", "downstream_lr"],
            2: ["name", "upstream", "ckpt", "rate"]}[index]
    field = draw(st.sampled_from(used))
    optional = field in ("rate", "downstream_lr") or (field == "upstream" and index == 0)
    entry[field] = draw(spoiled(MODEL_FIELDS[field]).filter(lambda v: not (v is None and optional)))
    return plan, f"models[{index}]"


@SETTINGS
@given(data=st.data())
def test_a_spoiled_plan_is_refused_naming_the_field(plan_folder, data):
    plan, field = data.draw(spoiled_plans(str(plan_folder / "model.pt")))
    with pytest.raises(PlanError) as error:
        load_plan_data(plan_folder, plan)
    assert field in str(error.value)


# --------------------------------------------------------------------------- -g options files
OPTION_FIELDS = {"base": "path", "mean_std": "path", "sparse_execution": "execution", "trust_checkpoint": "bool",
                 "precision": "precision", "compile": "bool"}


@pytest.fixture(scope="module")
def identity_delta(tmp_path_factory, hubert_ckpt) -> Path:
    from upstream_compressed.cli import main

    folder = tmp_path_factory.mktemp("options")
    recipe = folder / "identity.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(hubert_ckpt), "steps": []}))
    assert main(["compress", str(recipe), "-o", str(folder / "identity.safetensors")]) == 0
    return folder / "identity.safetensors"


def not_a_mapping(text: str) -> bool:
    """YAML text that is no mapping and not empty (or is no YAML at all)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return True
    return bool(value) and not isinstance(value, dict)


@SETTINGS
@given(data=st.data())
def test_a_spoiled_options_file_is_refused_naming_the_option(identity_delta, hubert_ckpt, s3prl_hub, data):
    """Through the real entry (``compressed_local``, as run_downstream.py -g calls it): refused before any load."""
    options: Any = {"base": str(hubert_ckpt), "sparse_execution": "auto", "trust_checkpoint": False}
    where = data.draw(st.sampled_from(["field", "unknown", "missing", "whole"]))
    if where == "whole":
        options, field = data.draw(st.one_of(st.lists(st.integers(), min_size=1), st.integers().filter(bool),
                                             TEXT.filter(not_a_mapping))), "options file (-g)"
    elif where == "unknown":
        field = data.draw(unknown_key(set(OPTION_FIELDS)))
        options[field] = data.draw(JUNK)
    elif where == "missing":
        field = data.draw(st.sampled_from(["base", "mean_std"]))
        options[field] = str(identity_delta.parent / "no_such.file")
    else:
        field = data.draw(st.sampled_from(sorted(OPTION_FIELDS)))
        if field == "sparse_execution":
            bad = st.one_of(JUNK, OUT_OF_RANGE).filter(lambda v: v is not None and v not in ("auto", "dense", "sparse"))
        elif field == "precision":
            bad = st.one_of(JUNK, OUT_OF_RANGE).filter(lambda v: v is not None and v not in ("fp32", "bf16", "fp16"))
        else:
            bad = spoiled(OPTION_FIELDS[field]).filter(lambda v: v is not None)
        options[field] = data.draw(bad)
    path = identity_delta.parent / "options.yaml"
    path.write_text(options if isinstance(options, str) else yaml.safe_dump(options))
    with pytest.raises(DeltaError) as error:
        s3prl_hub.compressed_local(ckpt=str(identity_delta), model_config=str(path))
    assert field in str(error.value)
