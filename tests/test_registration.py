"""register() adds every entry to s3prl.hub; named entries check the delta; bad audio is refused clearly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

import upstream_compressed
from upstream_compressed.cli import main as cli_main
from upstream_compressed.delta import DeltaError
from upstream_compressed.hubconf import BASE_ENV

from helpers import max_valid_difference


def identity_delta(tmp_path, ckpt):
    recipe = tmp_path / "identity.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(ckpt), "steps": []}))
    out = tmp_path / "identity.safetensors"
    assert cli_main(["compress", str(recipe), "-o", str(out)]) == 0
    return out


def test_importing_the_package_is_cheap():
    code = "import sys, upstream_compressed; print('s3prl' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_register_adds_every_entry_to_the_hub(s3prl_hub):
    names = upstream_compressed.register()
    for expected in ("hubert_identity", "distilhubert_identity", "hubert_headpruned", "hubert_kd_head_lr",
                     "distilhubert_lowrank", "hubert_weightpruned", "compressed_local"):
        assert expected in names
    assert all(callable(getattr(s3prl_hub, name)) for name in names)


@pytest.mark.parametrize("family,reference", [("hubert", "hubert_local"), ("distilhubert", "distiller_local")])
def test_identity_upstream_equals_s3prl_upstream(tmp_path, s3prl_hub, padded_batch, hubert_ckpt, distiller_ckpt,
                                                 family, reference):
    ckpt = hubert_ckpt if family == "hubert" else distiller_ckpt
    delta = identity_delta(tmp_path, ckpt)
    ours = getattr(s3prl_hub, f"{family}_identity")(ckpt=str(delta), model_config=None, refresh=False)
    theirs = getattr(s3prl_hub, reference)(ckpt=str(ckpt)).eval()
    assert ours.get_downsample_rates("hidden_states") == 320
    with torch.no_grad():
        result = ours(padded_batch)
        expected = theirs([w.clone() for w in padded_batch])["hidden_states"]
    padding = ~result["pad_mask"]
    assert len(result["hidden_states"]) == len(expected)
    for a, b in zip(result["hidden_states"], expected):
        assert max_valid_difference(a, b, padding) < 1e-5
    frames = result["hidden_states"][0].shape[1]
    assert abs(frames - round(16000 / 320)) <= 5


def test_named_entry_refuses_a_delta_of_another_technique_or_family(tmp_path, s3prl_hub, hubert_ckpt):
    delta = identity_delta(tmp_path, hubert_ckpt)
    with pytest.raises(DeltaError, match="technique 'identity'.*headpruned"):
        s3prl_hub.hubert_headpruned(ckpt=str(delta))
    with pytest.raises(DeltaError, match="compresses a hubert base"):
        s3prl_hub.distilhubert_identity(ckpt=str(delta))
    assert s3prl_hub.compressed_local(ckpt=str(delta)).manifest["technique"] == "identity"


@pytest.mark.parametrize("steps,technique", [
    ([], "identity"),
    ([{"method": "head_pruning", "ratio": 0.5}, {"method": "weight_pruning", "sparsity": 0.5}], "head_wp"),
])
def test_a_refused_delta_s_message_names_only_upstreams_that_exist(tmp_path, s3prl_hub, hubert_ckpt, steps, technique):
    """head + weight pruning is ``head_wp``: no ``hubert_head_wp`` entry exists, so only compressed_local is named."""
    import re

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(hubert_ckpt), "steps": steps}))
    delta = tmp_path / "d.safetensors"
    assert cli_main(["compress", str(recipe), "-o", str(delta)]) == 0
    for entry in (s3prl_hub.hubert_rowpruned, s3prl_hub.distilhubert_identity):
        with pytest.raises(DeltaError) as error:
            entry(ckpt=str(delta))
        named = re.findall(r"-u (\w+)", str(error.value))
        assert named and all(callable(getattr(s3prl_hub, name, None)) for name in named), str(error.value)
        assert (f"hubert_{technique}" in named) == (technique == "identity")
    assert s3prl_hub.compressed_local(ckpt=str(delta)).manifest["technique"] == technique


def assert_runs_the_base(upstream, base_path, reference, padded_batch) -> None:
    """The upstream holds ``base_path``'s weights and computes what S3PRL's own loader computes from it."""
    from upstream_compressed.model.convert import load_base

    expected = load_base(base_path).state_dict
    weights = upstream.model.state_dict()
    assert set(weights) == set(expected)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    with torch.no_grad():
        ours = upstream(padded_batch)
        theirs = reference([w.clone() for w in padded_batch])["hidden_states"]
    for a, b in zip(ours["hidden_states"], theirs):
        assert max_valid_difference(a, b, ~ours["pad_mask"]) < 1e-5


def test_base_is_found_from_options_then_env_when_the_recorded_one_is_gone(tmp_path, s3prl_hub, padded_batch,
                                                                            monkeypatch):
    """The recorded base is moved away first, so only ``-g base:`` (or the variable) can make loading work."""
    from upstream_compressed.testing.checkpoints import make_hubert_checkpoint

    recorded = make_hubert_checkpoint(tmp_path / "work" / "base.pt", seed=3)
    delta = identity_delta(tmp_path, recorded)
    moved = tmp_path / "elsewhere" / "renamed.pt"
    moved.parent.mkdir()
    recorded.rename(moved)
    assert not (delta.parent / "base.pt").exists()  # nor a copy beside the delta
    monkeypatch.delenv(BASE_ENV, raising=False)
    with pytest.raises(DeltaError, match="cannot find the base"):
        s3prl_hub.hubert_identity(ckpt=str(delta))
    reference = s3prl_hub.hubert_local(ckpt=str(moved)).eval()
    options = tmp_path / "options.yaml"
    options.write_text(yaml.safe_dump({"base": str(moved)}))
    assert_runs_the_base(s3prl_hub.hubert_identity(ckpt=str(delta), model_config=str(options)), moved, reference,
                         padded_batch)
    # The variable names it too; -g comes first (a wrong file in the variable is then not read).
    monkeypatch.setenv(BASE_ENV, str(moved))
    assert_runs_the_base(s3prl_hub.hubert_identity(ckpt=str(delta)), moved, reference, padded_batch)
    wrong = tmp_path / "wrong.pt"
    wrong.write_bytes(moved.read_bytes() + b"x")
    monkeypatch.setenv(BASE_ENV, str(wrong))
    assert_runs_the_base(s3prl_hub.hubert_identity(ckpt=str(delta), model_config=str(options)), moved, reference,
                         padded_batch)
    with pytest.raises(DeltaError, match="sha256"):  # a wrong file is refused, not loaded
        s3prl_hub.hubert_identity(ckpt=str(delta))


def test_recorded_base_gone_falls_back_to_a_file_beside_the_delta(tmp_path, s3prl_hub, padded_batch, monkeypatch):
    from upstream_compressed.testing.checkpoints import make_hubert_checkpoint

    monkeypatch.delenv(BASE_ENV, raising=False)
    base = make_hubert_checkpoint(tmp_path / "work" / "base.pt")
    delta = identity_delta(tmp_path, base)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "base.pt").write_bytes(base.read_bytes())
    (shipped / "d.safetensors").write_bytes(delta.read_bytes())
    base.unlink()
    reference = s3prl_hub.hubert_local(ckpt=str(shipped / "base.pt")).eval()
    assert_runs_the_base(s3prl_hub.hubert_identity(ckpt=str(shipped / "d.safetensors")), shipped / "base.pt",
                         reference, padded_batch)
    (shipped / "base.pt").unlink()
    with pytest.raises(DeltaError, match="cannot find the base"):
        s3prl_hub.hubert_identity(ckpt=str(shipped / "d.safetensors"))


@pytest.mark.parametrize(
    "wavs,message",
    [
        ([], "empty list"),
        (torch.zeros(16000), "list of 1-D"),
        ([torch.zeros(0)], "0 samples"),
        ([torch.zeros(399)], "at least 400"),
        ([torch.zeros(2, 16000)], "1-D mono"),
        ([torch.zeros(16000, dtype=torch.int16)], "integer dtype"),
        ([torch.full((16000,), float("nan"))], "NaN"),
        ([torch.zeros(16000), torch.tensor([float("inf")] * 800)], "waveform 1 contains NaN or infinite"),
    ],
)
def test_bad_audio_is_refused_with_a_clear_error(tmp_path, s3prl_hub, hubert_ckpt, wavs, message):
    upstream = s3prl_hub.compressed_local(ckpt=str(identity_delta(tmp_path, hubert_ckpt)))
    with pytest.raises(ValueError, match=message):
        upstream(wavs)
    upstream([torch.zeros(400)])  # the shortest valid input works
