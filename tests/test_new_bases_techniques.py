"""Every technique compresses a WavLM and a wav2vec 2.0 base into its named upstream.

Each recipe runs on a tiny checkpoint in S3PRL's own layout (WavLM with its relative position bias and
gate). The delta loads through ``wavlm_<technique>`` / ``wav2vec2_<technique>`` in ``s3prl.hub``, and the
upstream's hidden states equal the compressed model rebuilt from the delta; the identity delta equals
S3PRL's own ``wavlm_local`` / ``wav2vec2_local``.
"""

from __future__ import annotations

import pytest
import torch

from upstream_compressed.compress import run_recipe
from upstream_compressed.delta import load_compressed, write_delta
from upstream_compressed.model.convert import load_base
from upstream_compressed.model.costs import parameter_count
from upstream_compressed.recipe import parse_recipe
from upstream_compressed.testing.wav2vec2_checkpoints import make_wav2vec2_checkpoint
from upstream_compressed.testing.wavlm_checkpoints import make_wavlm_checkpoint

from helpers import max_valid_difference, run_model

TOLERANCE = 1e-5
BASES = {"wavlm": make_wavlm_checkpoint, "wav2vec2": make_wav2vec2_checkpoint}


@pytest.fixture(scope="module", params=sorted(BASES))
def base(request, tmp_path_factory):
    name = request.param
    return name, BASES[name](tmp_path_factory.mktemp(name) / f"{name}.pt")


def _training(audio_dir, **extra) -> dict:
    return {"audio": str(audio_dir), "steps": 2, "batch_size": 2, "max_seconds": 0.5, "lr": 1e-3, "device": "cpu",
            **extra}


def _steps(technique: str, audio_dir, base_params: int) -> list[dict]:
    return {
        "headpruned": [{"method": "head_pruning", "ratio": 0.34, "criterion": "data_driven", "audio": str(audio_dir)}],
        "rowpruned": [{"method": "row_pruning", "ratio": 0.5, "criterion": "data_driven", "audio": str(audio_dir)}],
        "lowrank": [{"method": "low_rank", "ratio": 0.5, "targets": ["attention", "ffn"]}],
        "weightpruned": [{"method": "weight_pruning", "sparsity": 0.7}],
        "convpruned": [{"method": "conv_pruning", "ratio": 0.5, "conv_layers": [0, 3]}],
        "kd": [{"method": "distillation", "student_layers": 1, "pred_layers": [1, 2], **_training(audio_dir)}],
        "jointpruned": [{"method": "joint_pruning", "structures": ["conv", "heads", "ffn"],
                         "target_params": int(0.8 * base_params), "target_warmup_steps": 1, "gate_lr": 0.05,
                         **_training(audio_dir), "final_distillation": _training(audio_dir, seed=1)}],
    }[technique]


@pytest.mark.parametrize("technique", ["headpruned", "rowpruned", "lowrank", "weightpruned", "convpruned", "kd",
                                       "jointpruned"])
def test_every_technique_runs_through_its_named_upstream(tmp_path, s3prl_hub, audio_dir, padded_batch, base,
                                                         technique):
    family, ckpt = base
    recipe = parse_recipe({"base": str(ckpt), "steps": _steps(technique, audio_dir, parameter_count(load_base(ckpt).config))})
    delta = run_recipe(recipe, work_dir=tmp_path / "work")
    assert delta.technique == technique and delta.base_family == family
    path = write_delta(delta, tmp_path / "d.safetensors")

    upstream = getattr(s3prl_hub, f"{family}_{technique}")(ckpt=str(path), model_config=None, refresh=False).eval()
    with torch.no_grad():
        states = upstream(padded_batch)["hidden_states"]
    rebuilt, _ = load_compressed(path, ckpt)
    expected, padding = run_model(rebuilt, padded_batch)
    assert len(states) == len(expected) == delta.config.num_hidden_states
    for layer, (ours, theirs) in enumerate(zip(states, expected)):
        assert max_valid_difference(ours, theirs, padding) < TOLERANCE, f"hidden state {layer}"
    if technique != "weightpruned":
        assert delta.manifest["params"]["compressed"] < delta.manifest["params"]["base"]
    if technique == "headpruned" and family == "wavlm":  # the shared bias's columns follow each layer's heads
        assert all(layer.head_ids is not None for layer in delta.config.layers)


def test_the_identity_delta_equals_s3prls_own_upstream(tmp_path, s3prl_hub, padded_batch, base):
    family, ckpt = base
    path = write_delta(run_recipe(parse_recipe({"base": str(ckpt), "steps": []}), work_dir=tmp_path / "w"),
                       tmp_path / "identity.safetensors")
    ours = getattr(s3prl_hub, f"{family}_identity")(ckpt=str(path), model_config=None, refresh=False).eval()
    local = getattr(s3prl_hub, f"{family}_local")(ckpt=str(ckpt)).eval()
    with torch.no_grad():
        a, b = ours([w.clone() for w in padded_batch]), local([w.clone() for w in padded_batch])
    _, padding = run_model(load_compressed(path, ckpt)[0], padded_batch)
    assert len(a["hidden_states"]) == len(b["hidden_states"])
    for layer, (x, y) in enumerate(zip(a["hidden_states"], b["hidden_states"])):
        assert max_valid_difference(x, y, padding) < TOLERANCE, f"hidden state {layer}"
