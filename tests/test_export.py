"""``upstream-compressed export``: one self-contained file that ``compressed_local`` loads without the base."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from upstream_compressed.cli import main
from upstream_compressed.delta import SELF_CONTAINED_FORMAT_VERSION, DeltaError, read_delta


@pytest.fixture
def delta(tmp_path, hubert_ckpt, audio_dir):
    """Head pruning, then weight pruning with recovery (sparse tensors whose values changed), on a private base."""
    base = tmp_path / "base" / "tiny_hubert.pt"
    base.parent.mkdir()
    shutil.copy(hubert_ckpt, base)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(base), "steps": [
        {"method": "head_pruning", "ratio": 0.5},
        {"method": "weight_pruning", "sparsity": 0.6, "targets": ["ffn"],
         "recovery": {"audio": str(audio_dir), "steps": 2, "batch_size": 2, "max_seconds": 0.5, "device": "cpu"}},
    ]}))
    path = tmp_path / "d.safetensors"
    assert main(["compress", str(recipe), "-o", str(path)]) == 0
    return path, base


def hidden_states(s3prl_hub, name: str, ckpt, wavs) -> list[torch.Tensor]:
    with torch.no_grad():
        return getattr(s3prl_hub, name)(ckpt=str(ckpt)).eval()(wavs)["hidden_states"]


def test_export_round_trips_without_the_base(tmp_path, delta, s3prl_hub, padded_batch, capsys):
    delta_path, base = delta
    expected = hidden_states(s3prl_hub, "compressed_local", delta_path, padded_batch)
    full = tmp_path / "FULL.ckpt"
    assert main(["export", str(delta_path), "-o", str(full)]) == 0
    assert "self-contained" in capsys.readouterr().out
    base.unlink()  # no base anywhere: the delta alone no longer loads, the exported file does
    with pytest.raises(DeltaError, match="cannot find the base checkpoint"):
        hidden_states(s3prl_hub, "compressed_local", delta_path, padded_batch)
    exported = read_delta(full)
    assert exported.self_contained and exported.manifest["format_version"] == SELF_CONTAINED_FORMAT_VERSION
    original = read_delta(delta_path)
    assert any(name.endswith(".__values") for name in original.tensors)  # recovery changed kept values
    assert exported.manifest["sparse_tensors"] == original.manifest["sparse_tensors"]
    actual = hidden_states(s3prl_hub, "compressed_local", full, padded_batch)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)
    with pytest.raises(DeltaError, match="was made by technique"):  # named entries still check the manifest
        hidden_states(s3prl_hub, "hubert_headpruned", full, padded_batch[:1])


def test_export_needs_the_right_base_and_refuses_bad_input(tmp_path, delta, hubert_ckpt, capsys):
    delta_path, base = delta
    full = tmp_path / "full.ckpt"
    base.write_bytes(base.read_bytes() + b"\0")  # not the base the delta was made from
    assert main(["export", str(delta_path), "-o", str(full)]) == 2
    assert "wrong base file" in capsys.readouterr().err and not full.exists()
    shutil.copy(hubert_ckpt, base)
    assert main(["export", str(delta_path), "-o", str(full)]) == 0
    assert main(["export", str(full), "-o", str(tmp_path / "again.ckpt")]) == 2
    assert "already self-contained" in capsys.readouterr().err
    full.write_bytes(full.read_bytes()[:-100])  # truncated
    with pytest.raises(DeltaError, match="truncated or corrupted|checksum"):
        read_delta(full)
