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
    slice_base,
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


def test_structure_of_channels_and_removed_sublayers_composes_and_round_trips():
    structure = Structure.identity(type("C", (), {"num_layers": 2})())
    structure.keep_channels(2, [5, 1, 3], base_channels=8)  # conv layers 0 and 1 stay whole (None)
    structure.keep_channels(2, [2, 0], base_channels=8)
    structure.keep_channels(0, [1], base_channels=4)
    assert structure.conv_channels == [[1], None, [3, 5]]
    structure.keep_heads(1, [1], base_heads=4)
    structure.keep_units(0, [0, 2], base_units=6)
    structure.remove_attention(1)
    structure.remove_ffn(0)
    assert (structure.layers[1].attention, structure.layers[1].kept_heads) == (False, [])
    assert (structure.layers[0].ffn, structure.layers[0].kept_units) == (False, [])
    assert structure.layers[0].attention and structure.layers[1].ffn
    data = json.loads(json.dumps(structure.to_dict()))
    assert data["conv_channels"] == [[1], None, [3, 5]]
    assert "attention" not in data["layers"][0] and data["layers"][1]["attention"] is False
    assert Structure.from_dict(data) == structure
    assert "conv_channels" not in Structure.identity(type("C", (), {"num_layers": 1})()).to_dict()


def test_slice_base_applies_channels_heads_units_and_removed_sublayers(hubert_ckpt, padded_batch):
    """The sliced base equals the base model taken through the same operations one by one."""
    base = load_base(hubert_ckpt)
    structure = Structure.identity(base.config)
    structure.keep_channels(6, [3, 0, 7], base_channels=base.config.conv_layers[6][0])
    structure.keep_heads(0, [2, 1], base_heads=4)
    structure.keep_units(1, [4, 0, 9], base_units=base.config.layers[1].ffn_dim)
    structure.remove_attention(1)
    structure.remove_ffn(0)
    expected = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    expected.keep_channels(6, [3, 0, 7])
    expected.keep_heads(0, [2, 1])
    expected.keep_units(1, [4, 0, 9])
    expected.remove_attention(1)
    expected.remove_ffn(0)
    sliced = slice_base(base, structure)
    assert sliced.keys() == expected.state_dict().keys()
    assert all(torch.equal(sliced[k], v) for k, v in expected.state_dict().items())
    with pytest.raises(DeltaError, match="conv layers"):
        slice_base(base, Structure(structure.layers, [None] * (len(base.config.conv_layers) + 1)))
    with pytest.raises(DeltaError, match="conv layer 6"):
        slice_base(base, Structure(structure.layers, [None] * 6 + [[0, 0]]))


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


# ------------------------------------------------------------------- the format's smaller promises
def well_formed(**changes) -> dict:
    """The smallest manifest read_delta accepts (a dense delta of nothing), with ``changes``."""
    manifest = {"format": delta_module.FORMAT_NAME, "format_version": 1, "base": {"name": "b"}, "config": {},
                "structure": {"layers": []}, "technique": "t"}
    return {**manifest, **changes}


def test_a_minimal_well_formed_file_reads_back(tmp_path):
    path = tmp_path / "d.safetensors"
    rewrite(path, well_formed(), {"x": torch.arange(3.0)})
    delta = read_delta(path)
    assert delta.technique == "t" and torch.equal(delta.tensors["x"], torch.arange(3.0))
    assert not delta.self_contained


@pytest.mark.parametrize("changes,message", [
    ({"format": "other"}, r"unknown format 'other'"),
    ({"format_version": 0}, r"format version 0 is not supported by this upstream_compressed \(it reads versions 1, 2, "
                            r"3\); upgrade the package or re-create the delta"),
    ({"format_version": 3}, r"format version 3 and self_contained=None disagree"),
    ({"format_version": 1, "self_contained": True}, r"format version 1 and self_contained=True disagree"),
    ({"sparse_tensors": {"w": {}}}, r"sparse tensors need format version 2, the file says 1"),
    ({"technique": None, "base": None}, None),  # present, even if null: the keys are what is checked
])
def test_manifest_problems_are_named(tmp_path, changes, message):
    path = tmp_path / "d.safetensors"
    rewrite(path, well_formed(**changes), {})
    if message is None:
        assert read_delta(path).manifest["technique"] is None
        return
    with pytest.raises(DeltaError, match=message):
        read_delta(path)


def test_a_manifest_lacking_required_keys_names_them(tmp_path):
    path = tmp_path / "d.safetensors"
    manifest = well_formed()
    del manifest["technique"], manifest["structure"]
    rewrite(path, manifest, {})
    with pytest.raises(DeltaError, match=r"manifest lacks \['structure', 'technique'\]"):
        read_delta(path)


def test_a_safetensors_file_that_is_not_a_delta_is_named(tmp_path):
    path = tmp_path / "plain.safetensors"
    path.write_bytes(save({"x": torch.zeros(2)}))
    with pytest.raises(DeltaError, match=r"is a safetensors file but not an upstream_compressed delta \(no manifest\)"):
        read_delta(path)
    path.write_bytes(save({"x": torch.zeros(2)}, metadata={MANIFEST_KEY: "{}", MANIFEST_DIGEST_KEY: "0" * 64}))
    with pytest.raises(DeltaError, match="the manifest does not match its checksum; the file is corrupted"):
        read_delta(path)
    text = "{not json"
    path.write_bytes(save({}, metadata={MANIFEST_KEY: text, MANIFEST_DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}))
    with pytest.raises(DeltaError, match="the manifest is not valid JSON"):
        read_delta(path)


def test_a_missing_or_damaged_file_says_what_to_pass(tmp_path):
    with pytest.raises(DeltaError, match=r"pass the \.safetensors written by `upstream-compressed compress` as -k"):
        read_delta(tmp_path / "nope.safetensors")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10" + b"\x00" * 7 + b"{")
    with pytest.raises(DeltaError, match=r"is not a readable safetensors delta \(truncated or corrupted\?\)"):
        read_delta(damaged)


def test_sha256_file_hashes_files_longer_than_its_read_chunk(tmp_path):
    data = os.urandom(2_500_000)  # 2.4 MiB: more than two 1 MiB reads
    (tmp_path / "f").write_bytes(data)
    assert delta_module.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert delta_module.sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_the_tensor_digest_covers_names_dtypes_shapes_and_bytes_and_not_order():
    digest = delta_module._tensor_digest
    x = torch.arange(6, dtype=torch.float32)
    reference = digest({"a": x, "b": torch.zeros(0)})
    assert digest({"b": torch.zeros(0), "a": x.clone()}) == reference  # insertion order does not matter
    assert digest({"a": x}) != reference  # an empty tensor still counts
    variants = [{"c": x}, {"a": x.view(torch.int32)}, {"a": x.reshape(2, 3)}, {"a": x + 1}]
    digests = {digest({**v, "b": torch.zeros(0)}) for v in variants}
    assert len(digests) == len(variants) and reference not in digests
    grid = torch.arange(6.0).reshape(2, 3)
    assert digest({"g": grid.T}) == digest({"g": grid.T.contiguous()})  # the values, not the memory layout


def test_packed_masks_round_trip_and_wrong_ones_are_named():
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = delta_module.pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (2,)  # 15 bits in 2 bytes
    assert torch.equal(delta_module.unpack_mask(packed, [3, 5], "w"), mask)
    message = r"mask of sparse tensor w has {} entries; a packed mask of shape \(3, 5\) needs 2 uint8"
    with pytest.raises(DeltaError, match=message.format(r"3 torch\.uint8")):
        delta_module.unpack_mask(torch.zeros(3, dtype=torch.uint8), [3, 5], "w")
    with pytest.raises(DeltaError, match=message.format(r"2 torch\.int8")):
        delta_module.unpack_mask(packed.to(torch.int8), [3, 5], "w")
    with pytest.raises(DeltaError, match=message.format(r"2 torch\.uint8")):
        delta_module.unpack_mask(packed.reshape(1, 2), [3, 5], "w")


def test_structures_round_trip_and_compose_units_like_heads():
    structure = Structure.identity(type("C", (), {"num_layers": 2})())
    assert [(o.source_layer, o.kept_heads, o.kept_units) for o in structure.layers] == [(0, None, None), (1, None, None)]
    structure.keep_units(1, [5, 2, 7], base_units=8)
    structure.keep_units(1, [2, 0], base_units=8)
    assert structure.layers[1].kept_units == [7, 5]
    structure.keep_heads(0, [1], base_heads=4)
    assert Structure.from_dict(json.loads(json.dumps(structure.to_dict()))) == structure


def test_the_manifest_records_what_was_made_and_how(hubert_ckpt):
    model, delta = pruned_delta(hubert_ckpt, modify=True)
    manifest = delta.manifest
    base = load_base(hubert_ckpt)
    assert manifest["params"] == {"base": SpeechTransformer.from_state_dict(base.config, base.state_dict).num_parameters(),
                                  "compressed": model.num_parameters()}
    assert manifest["params"]["compressed"] < manifest["params"]["base"]
    assert manifest["tensors_sha256"] == delta_module._tensor_digest(delta.tensors)
    assert manifest["technique"] == "headpruned" and manifest["recipe"]["steps"] == []
    assert manifest["format_version"] == 1 and "sparse_tensors" not in manifest
    identity = base_identity(str(hubert_ckpt), hubert_ckpt, base)
    extra = make_delta(base, identity, model, delta.structure, {}, "headpruned", extra={"note": "kept"})
    assert extra.manifest["note"] == "kept"


def fake_delta(**base) -> delta_module.Delta:
    return delta_module.Delta({"base": base}, {})


def test_check_base_names_the_missing_or_wrong_base_and_what_to_do(tmp_path):
    right = tmp_path / "right.pt"
    right.write_bytes(b"right")
    delta = fake_delta(name="tiny_hubert", sha256=hashlib.sha256(b"right").hexdigest())
    delta_module.check_base(delta, right)  # no error
    with pytest.raises(DeltaError, match=r"base checkpoint .*nowhere.pt not found; the delta was made from 'tiny_hubert'\. "
                                         r"Pass its path with -g \(yaml `base: PATH`\) or UPSTREAM_COMPRESSED_BASE"):
        delta_module.check_base(delta, tmp_path / "nowhere.pt")
    wrong = tmp_path / "wrong.pt"
    wrong.write_bytes(b"wrong")
    expected = (rf"has sha256 {hashlib.sha256(b'wrong').hexdigest()[:16]}\.\.\., but the delta was made from a base with "
                rf"sha256 {hashlib.sha256(b'right').hexdigest()[:16]}\.\.\. \('tiny_hubert'\); wrong base file")
    with pytest.raises(DeltaError, match=expected):
        delta_module.check_base(delta, wrong)


@pytest.fixture
def stats_files(tmp_path):
    """A MelHuBERT-style statistics file recorded in a manifest, and a base checkpoint in another folder."""
    recorded = tmp_path / "made" / "mean_std.npy"
    recorded.parent.mkdir()
    recorded.write_bytes(b"statistics")
    base = tmp_path / "base" / "melhubert.ckpt"
    base.parent.mkdir()
    base.write_bytes(b"base")
    mean_std = {"file_name": "mean_std.npy", "path": str(recorded), "sha256": hashlib.sha256(b"statistics").hexdigest()}
    return fake_delta(name="mel", mean_std=mean_std), recorded, base


def test_a_delta_without_statistics_needs_none(tmp_path):
    assert delta_module.find_mean_std(fake_delta(name="hubert"), tmp_path / "base.pt") is None


def test_statistics_are_found_explicit_first_then_recorded_then_beside_the_base_then_searched(stats_files, tmp_path):
    delta, recorded, base = stats_files
    find = delta_module.find_mean_std
    explicit = tmp_path / "explicit.npy"
    explicit.write_bytes(b"statistics")
    beside = base.parent / "mean_std.npy"
    beside.write_bytes(b"statistics")
    searched = tmp_path / "search" / "mean_std.npy"
    searched.parent.mkdir()
    searched.write_bytes(b"statistics")
    assert find(delta, base, explicit, [searched.parent]) == explicit
    assert find(delta, base, None, [searched.parent]) == recorded
    recorded.unlink()
    assert find(delta, base, None, [searched.parent]) == beside
    beside.unlink()
    assert find(delta, base, None, [tmp_path / "elsewhere", searched.parent]) == searched


def test_missing_or_wrong_statistics_are_named(stats_files, tmp_path):
    delta, recorded, base = stats_files
    find = delta_module.find_mean_std
    with pytest.raises(DeltaError, match=r"fbank mean/std file .*absent\.npy does not exist"):
        find(delta, base, tmp_path / "absent.npy")
    recorded.write_bytes(b"other statistics")
    with pytest.raises(DeltaError, match=r"has sha256 .*, but the delta was made with .* \(mean_std\.npy\); wrong statistics"):
        find(delta, base)
    with pytest.raises(DeltaError, match="wrong statistics"):  # an explicit file is checked too
        find(delta, base, recorded)
    recorded.unlink()
    with pytest.raises(DeltaError, match=r"cannot find the fbank mean/std file of this MelHuBERT delta's base \(recorded "
                                         r"as .*mean_std\.npy\); put it beside the base checkpoint, or pass it with -g "
                                         r"OPTIONS\.yaml containing `mean_std: PATH`"):
        find(delta, base, None, [tmp_path])
    (base.parent / "mean_std.npy").write_bytes(b"statistics")
    nameless = fake_delta(name="mel", mean_std={**delta.manifest["base"]["mean_std"], "file_name": ""})
    with pytest.raises(DeltaError, match="cannot find"):  # no name: nothing beside the base can be it
        find(nameless, base)


def test_apply_delta_names_what_cannot_be_built(written, hubert_ckpt):
    delta = read_delta(written)
    base = load_base(hubert_ckpt)
    broken = delta_module.Delta({**delta.manifest, "config": {"no_such_option": 1}}, delta.tensors)
    with pytest.raises(DeltaError, match="the delta's config/structure is invalid"):
        apply_delta(broken, base)
    with pytest.raises(DeltaError, match="stores only what differs from its base: the base checkpoint is needed"):
        apply_delta(delta, None)
    exported = delta_module.export_self_contained(delta, base)
    assert exported.self_contained and delta_module.export_self_contained(exported, base) is exported
    assert not delta.self_contained  # the original is left as it was
    name = "layers.0.attention.q_proj.weight"
    incomplete = delta_module.Delta(exported.manifest, {k: v for k, v in exported.tensors.items() if k != name})
    with pytest.raises(DeltaError, match=rf"tensor {name} is neither in the delta nor derivable from the base"):
        apply_delta(incomplete, None)
    wrong = delta_module.Delta(delta.manifest, {**delta.tensors, "layers.0.final_norm.weight": torch.zeros(3)})
    with pytest.raises(DeltaError, match=r"final_norm\.weight from the delta has shape \(3,\)"):
        apply_delta(wrong, base)


def test_a_self_contained_delta_is_built_without_any_base(written, hubert_ckpt, padded_batch, tmp_path):
    delta = read_delta(written)
    base = load_base(hubert_ckpt)
    exported = delta_module.export_self_contained(delta, base)
    assert exported.manifest["format_version"] == delta_module.SELF_CONTAINED_FORMAT_VERSION
    assert exported.manifest["tensors_sha256"] == delta_module._tensor_digest(exported.tensors)
    alone = delta_module.build_compressed(exported, tmp_path / "no_base_here.pt")
    expected, _ = run_model(apply_delta(delta, base), padded_batch)
    states, _ = run_model(alone, padded_batch)
    assert all(torch.equal(a, b) for a, b in zip(states, expected))


def test_exporting_leaves_the_original_manifest_untouched(written, hubert_ckpt):
    delta = read_delta(written)
    original = json.loads(json.dumps(delta.manifest))
    exported = delta_module.export_self_contained(delta, load_base(hubert_ckpt))
    exported.manifest["structure"]["layers"].clear()
    exported.manifest["base"]["name"] = "changed"
    assert delta.manifest == original  # nested parts are copies, not shared


def test_load_compressed_finds_melhubert_statistics_beside_the_delta_or_where_it_is_told(tmp_path):
    from upstream_compressed.compress import run_recipe
    from upstream_compressed.recipe import parse_recipe
    from upstream_compressed.testing.checkpoints import make_melhubert_checkpoint

    base = make_melhubert_checkpoint(tmp_path / "base" / "mel.ckpt")
    made_with = base.parent / f"{base.stem}.mean-std.npy"
    delta = run_recipe(parse_recipe({"base": str(base), "steps": []}), work_dir=tmp_path / "work")
    path = write_delta(delta, tmp_path / "out" / "d.safetensors")
    moved = tmp_path / "out" / made_with.name  # beside the delta, nowhere else
    made_with.rename(moved)
    model, _ = load_compressed(path, base)
    assert model.config.fbank_stack == load_base(base, mean_std=moved).config.fbank_stack
    elsewhere = tmp_path / "elsewhere.npy"
    moved.rename(elsewhere)
    with pytest.raises(DeltaError, match="cannot find the fbank mean/std file"):
        load_compressed(path, base)
    load_compressed(path, base, mean_std=elsewhere)  # told where: found and verified
