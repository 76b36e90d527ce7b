"""The delta format: round trips, compactness, and a clear DeltaError for every bad file."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save

from upstream_compressed import delta as delta_module
from upstream_compressed.compress import base_identity
from upstream_compressed.delta import (
    MANIFEST_DIGEST_KEY,
    MANIFEST_KEY,
    DeltaError,
    Structure,
    apply_delta,
    load_compressed,
    make_delta,
    read_delta,
    write_delta,
)
from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import load_base
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint

from helpers import max_valid_difference, run_model


def pruned_delta(ckpt, modify: bool = False):
    """Prune heads of layer 0 and units of layer 1 (optionally change a tensor) and describe it as a delta."""
    base = load_base(ckpt)
    model = SpeechTransformer(base.config)
    model.load_state_dict(base.state_dict)
    structure = Structure.identity(base.config)
    model.keep_heads(0, [2, 0])
    structure.keep_heads(0, [2, 0], base_heads=4)
    model.keep_units(1, list(range(0, 128, 2)))
    structure.keep_units(1, list(range(0, 128, 2)), base_units=128)
    if modify:
        with torch.no_grad():
            model.layers[1].feed_forward.fc1.weight.mul_(0.5)
    identity = base_identity(str(ckpt), ckpt, base)
    return model, make_delta(base, identity, model, structure, {"base": str(ckpt), "steps": []}, "headpruned")


def test_identity_delta_stores_nothing_and_rebuilds_the_base(tmp_path, hubert_ckpt, padded_batch):
    base = load_base(hubert_ckpt)
    model = SpeechTransformer(base.config)
    model.load_state_dict(base.state_dict)
    delta = make_delta(
        base, base_identity(str(hubert_ckpt), hubert_ckpt, base), model, Structure.identity(base.config), {}, "identity"
    )
    assert delta.tensors == {}
    path = write_delta(delta, tmp_path / "identity.safetensors")
    rebuilt, read = load_compressed(path, hubert_ckpt)
    assert read.manifest == json.loads(json.dumps(delta.manifest))
    expected, mask = run_model(model, padded_batch)
    states, _ = run_model(rebuilt, padded_batch)
    assert all(torch.equal(a, b) for a, b in zip(states, expected))


def test_sliced_tensors_are_not_stored_changed_ones_are(tmp_path, hubert_ckpt, padded_batch):
    model, delta = pruned_delta(hubert_ckpt)
    assert delta.tensors == {}, "pure slicing of the base needs no stored tensor"
    model, delta = pruned_delta(hubert_ckpt, modify=True)
    assert sorted(delta.tensors) == ["layers.1.feed_forward.fc1.weight"]
    path = write_delta(delta, tmp_path / "pruned.safetensors")
    rebuilt, _ = load_compressed(path, hubert_ckpt)
    assert rebuilt.config == model.config
    expected, mask = run_model(model, padded_batch)
    states, _ = run_model(rebuilt, padded_batch)
    for a, b in zip(states, expected):
        assert max_valid_difference(a, b, mask) == 0


def test_structure_composes_over_repeated_pruning():
    structure = Structure.identity(type("C", (), {"num_layers": 1})())
    structure.keep_heads(0, [3, 1, 0], base_heads=4)
    structure.keep_heads(0, [2, 0], base_heads=4)
    assert structure.layers[0].kept_heads == [0, 3]


# ---------------------------------------------------------------------------- bad files
@pytest.fixture
def written(tmp_path, hubert_ckpt):
    _, delta = pruned_delta(hubert_ckpt, modify=True)
    return write_delta(delta, tmp_path / "delta.safetensors")


def header_length(path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def test_flipped_byte_in_tensor_data_is_refused(written, hubert_ckpt):
    data = bytearray(written.read_bytes())
    data[-5] ^= 0xFF
    written.write_bytes(bytes(data))
    with pytest.raises(DeltaError, match="corrupted"):
        load_compressed(written, hubert_ckpt)


@pytest.mark.parametrize("position", range(10, 400, 37))
def test_flipped_byte_in_header_is_refused(written, hubert_ckpt, position):
    data = bytearray(written.read_bytes())
    assert position < 8 + header_length(written)
    data[8 + position] ^= 0x01
    written.write_bytes(bytes(data))
    with pytest.raises(DeltaError):
        load_compressed(written, hubert_ckpt)


@pytest.mark.parametrize("keep", [0, 4, 8, 100, -3])
def test_truncated_file_is_refused(written, hubert_ckpt, keep):
    data = written.read_bytes()
    written.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(DeltaError):
        load_compressed(written, hubert_ckpt)


def test_missing_delta_and_missing_base_are_named(tmp_path, written):
    with pytest.raises(DeltaError, match="does not exist"):
        read_delta(tmp_path / "nope.safetensors")
    with pytest.raises(DeltaError, match="not found"):
        load_compressed(written, tmp_path / "missing_base.pt")


def test_wrong_base_is_refused_by_sha256(tmp_path, written):
    other = make_hubert_checkpoint(tmp_path / "other.pt", seed=7)
    with pytest.raises(DeltaError, match="sha256"):
        load_compressed(written, other)


def rewrite(path, manifest: dict, tensors: dict) -> None:
    """Write a well-formed file (valid checksums) with a manifest/tensors of our choosing."""
    manifest["tensors_sha256"] = delta_module._tensor_digest(tensors)
    text = json.dumps(manifest)
    metadata = {MANIFEST_KEY: text, MANIFEST_DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}
    path.write_bytes(save(tensors, metadata=metadata))


def test_unknown_format_version_is_refused(written, hubert_ckpt):
    delta = read_delta(written)
    rewrite(written, {**delta.manifest, "format_version": 99}, delta.tensors)
    with pytest.raises(DeltaError, match="version 99"):
        load_compressed(written, hubert_ckpt)


def test_tensor_shape_that_does_not_fit_the_structure_is_refused(written, hubert_ckpt):
    delta = read_delta(written)
    rewrite(written, delta.manifest, {"layers.1.feed_forward.fc1.weight": torch.zeros(128, 64)})
    with pytest.raises(DeltaError, match=r"shape \(128, 64\).*\(64, 64\)"):
        load_compressed(written, hubert_ckpt)


def test_structure_that_does_not_fit_the_base_is_refused(written, hubert_ckpt):
    delta = read_delta(written)
    manifest = json.loads(json.dumps(delta.manifest))
    manifest["structure"]["layers"][0]["kept_heads"] = [0, 9]
    rewrite(written, manifest, delta.tensors)
    with pytest.raises(DeltaError, match="layer 0"):
        load_compressed(written, hubert_ckpt)


def test_unknown_tensor_is_refused(written, hubert_ckpt):
    delta = read_delta(written)
    rewrite(written, delta.manifest, {**delta.tensors, "layers.9.evil": torch.zeros(1)})
    with pytest.raises(DeltaError, match="layers.9.evil"):
        load_compressed(written, hubert_ckpt)


class _Payload:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_posing_as_a_delta_is_refused_without_running_it(tmp_path, hubert_ckpt):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"model": payload}))
    with pytest.raises(DeltaError):
        load_compressed(evil, hubert_ckpt)
    torch_file = tmp_path / "evil2.safetensors"
    torch.save({"model": payload}, torch_file)
    with pytest.raises(DeltaError):
        load_compressed(torch_file, hubert_ckpt)
    assert not marker.exists()


def test_write_is_atomic(tmp_path, hubert_ckpt, monkeypatch):
    _, delta = pruned_delta(hubert_ckpt, modify=True)
    path = write_delta(delta, tmp_path / "delta.safetensors")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(delta_module.os, "replace", crash)
    with pytest.raises(OSError):
        write_delta(delta, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta.safetensors"]


def test_apply_delta_checks_layer_count(hubert_ckpt, written):
    delta = read_delta(written)
    delta.manifest["structure"]["layers"].pop()
    with pytest.raises(DeltaError, match="structure has 1 layers"):
        apply_delta(delta, load_base(hubert_ckpt))
