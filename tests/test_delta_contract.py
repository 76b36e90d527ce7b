"""The delta format's smaller promises, pinned exactly: the manifest's sparsity summary, what a malformed
sparse manifest is told, the messages naming each problem, byte-stable files, a base left as it was."""

from __future__ import annotations

import copy
import hashlib
import json
import re

import pytest
import torch

from upstream_compressed import delta as delta_module
from upstream_compressed.compress import base_identity
from upstream_compressed.delta import (
    MASK_SUFFIX,
    VALUES_SUFFIX,
    Delta,
    DeltaError,
    LayerOrigin,
    Structure,
    apply_delta,
    export_self_contained,
    make_delta,
    slice_base,
    write_delta,
)
from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import CheckpointError, Converted, load_base

from test_delta import pruned_delta

Q0 = "layers.0.attention.q_proj.weight"
FC1 = "layers.1.feed_forward.fc1.weight"


def exactly(message: str) -> str:
    """A pattern matching ``message`` and nothing more (pytest's match searches)."""
    return "^" + re.escape(message) + "$"


def keep_first(shape: tuple[int, int], count: int) -> torch.Tensor:
    """A mask keeping the first ``count`` entries in row-major order."""
    mask = torch.zeros(shape, dtype=torch.bool)
    mask.view(-1)[:count] = True
    return mask


def weight_pruned(ckpt, heads=None):
    """Layer 0's q_proj keeps 1000 of its 64x64 weights, layer 1's fc1 3000 of its 128x64 (no recovery:
    bits only); ``heads``: layer 0 keeps those heads first."""
    base = load_base(ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    structure = Structure.identity(base.config)
    if heads is not None:
        model.keep_heads(0, heads)
        structure.keep_heads(0, heads, base_heads=4)
    q_shape = tuple(model.linear(0, "q_proj").weight.shape)
    model.prune_weights(0, "q_proj", keep_first(q_shape, 1000))
    model.prune_weights(1, "fc1", keep_first((128, 64), 3000))
    identity = base_identity(str(ckpt), ckpt, base)
    return base, model, make_delta(base, identity, model, structure, {"steps": []}, "weightpruned")


# ------------------------------------------------------------------------------ the sparsity summary
def test_the_sparsity_summary_counts_exactly_what_the_masks_keep(hubert_ckpt):
    _, model, delta = weight_pruned(hubert_ckpt)
    summary = delta.manifest["sparsity"]
    assert set(summary) == {"scope", "linears", "weights", "kept", "sparsity", "params_nonzero"}
    assert summary["linears"] == {"layers.0.attention.q_proj": {"shape": [64, 64], "kept": 1000},
                                  "layers.1.feed_forward.fc1": {"shape": [128, 64], "kept": 3000}}
    assert (summary["weights"], summary["kept"]) == (64 * 64 + 128 * 64, 4000)
    assert summary["sparsity"] == pytest.approx(1 - 4000 / 12288)
    assert summary["params_nonzero"] == model.num_parameters() - (12288 - 4000)
    assert delta.manifest["sparse_tensors"] == {Q0: {"shape": [64, 64], "kept": 1000},
                                                FC1: {"shape": [128, 64], "kept": 3000}}


def test_a_model_without_masked_weights_is_summarised_as_not_sparse(hubert_ckpt):
    base = load_base(hubert_ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    summary = delta_module._sparsity_summary(model)
    assert (summary["linears"], summary["weights"], summary["kept"]) == ({}, 0, 0)
    assert summary["sparsity"] == 0.0  # not 1 - 0/0, not "all pruned"
    assert summary["params_nonzero"] == model.num_parameters()


# ------------------------------------------------------------------------------------- writing
def reordered(value):
    """``value`` with every mapping's keys in reverse insertion order (equal, but not as a sequence)."""
    if isinstance(value, dict):
        return {key: reordered(value[key]) for key in reversed(list(value))}
    return value


def stored_manifest(path) -> tuple[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    return metadata[delta_module.MANIFEST_KEY], metadata[delta_module.MANIFEST_DIGEST_KEY]


def test_equal_deltas_store_the_same_manifest_text_whatever_the_key_order(tmp_path, hubert_ckpt):
    """The manifest text (and so its checksum) depends only on its content. (Not the whole file: safetensors
    writes its two metadata entries in an order of its own, which can differ from one write to the next.)"""
    _, delta = pruned_delta(hubert_ckpt, modify=True)
    other = Delta(reordered(copy.deepcopy(delta.manifest)), dict(delta.tensors))
    assert other.manifest == delta.manifest and list(other.manifest) != list(delta.manifest)
    first = stored_manifest(write_delta(delta, tmp_path / "a.safetensors"))
    assert stored_manifest(write_delta(other, tmp_path / "b.safetensors")) == first
    assert first[0] == json.dumps(delta.manifest, sort_keys=True)


# ---------------------------------------------------------------------------- malformed sparse entries
def with_sparse(delta: Delta, specs, tensors: dict | None = None) -> Delta:
    return Delta({**delta.manifest, "sparse_tensors": specs}, delta.tensors if tensors is None else tensors)


@pytest.fixture
def sparse_delta(hubert_ckpt):
    base, model, delta = weight_pruned(hubert_ckpt)
    return base, model, delta


def test_sparse_tensors_that_are_not_a_mapping_are_refused(sparse_delta):
    base, _, delta = sparse_delta
    with pytest.raises(DeltaError, match=exactly("the manifest's sparse_tensors is not a mapping")):
        apply_delta(with_sparse(delta, [[Q0, [64, 64]]]), base)


@pytest.mark.parametrize("name", ["layers.0.attention.q_proj.bias", "encoder_norm.weight", "layers.7.feed_forward.fc1.weight"])
def test_a_sparse_entry_that_is_not_a_masked_linear_weight_is_named(sparse_delta, name):
    base, _, delta = sparse_delta
    specs = {**delta.manifest["sparse_tensors"], name: {"shape": [64], "kept": 1}}
    message = (f"sparse tensor {name} is not a masked Linear weight of the model its config describes "
               "(config layers[].sparse lists the masked Linears)")
    with pytest.raises(DeltaError, match=exactly(message)):
        apply_delta(with_sparse(delta, specs), base)


def test_a_sparse_entry_that_is_not_a_mapping_is_refused_naming_its_tensor(sparse_delta):
    base, _, delta = sparse_delta
    specs = {**delta.manifest["sparse_tensors"], Q0: [64, 64]}
    with pytest.raises(DeltaError, match=exactly(f"sparse tensor {Q0} has shape None, but the structure needs (64, 64)")):
        apply_delta(with_sparse(delta, specs), base)


def test_a_wrong_sized_mask_is_named_by_its_tensor(sparse_delta):
    base, _, delta = sparse_delta
    tensors = {**delta.tensors, Q0 + MASK_SUFFIX: torch.zeros(3, dtype=torch.uint8)}
    message = f"mask of sparse tensor {Q0} has 3 torch.uint8 entries; a packed mask of shape (64, 64) needs 512 uint8"
    with pytest.raises(DeltaError, match=exactly(message)):
        apply_delta(Delta(delta.manifest, tensors), base)


def test_kept_values_in_neither_the_delta_nor_the_sliced_base_are_named(hubert_ckpt):
    base, _, delta = weight_pruned(hubert_ckpt, heads=[2, 0])
    assert Q0 + VALUES_SUFFIX not in delta.tensors  # bits only: the sliced base holds the kept values
    message = f"kept values of sparse tensor {Q0} are neither in the delta nor in the sliced base"
    # no base at all: a self-contained delta that lost its values
    exported = export_self_contained(delta, base)
    lost = {k: v for k, v in exported.tensors.items() if k != Q0 + VALUES_SUFFIX}
    with pytest.raises(DeltaError, match=exactly(message)):
        apply_delta(Delta(exported.manifest, lost), None)
    # a sliced base of another shape: the structure no longer says layer 0 kept heads [2, 0]
    manifest = copy.deepcopy(delta.manifest)
    manifest["structure"]["layers"][0]["kept_heads"] = None
    with pytest.raises(DeltaError, match=exactly(message)):
        apply_delta(Delta(manifest, delta.tensors), base)


def test_half_precision_sparse_values_are_rebuilt_in_half_precision(sparse_delta):
    base, model, delta = sparse_delta
    exported = export_self_contained(delta, base)
    half = {k: v.half() if v.is_floating_point() else v for k, v in exported.tensors.items()}
    with torch.device("meta"):
        target = SpeechTransformer(delta.config).state_dict()
    rebuilt = delta_module._sparse_tensors(Delta(exported.manifest, half), {}, target)
    assert rebuilt[Q0].dtype == torch.float16 and rebuilt[FC1].dtype == torch.float16
    assert torch.equal(rebuilt[Q0], model.state_dict()[Q0].half())
    built = apply_delta(Delta(exported.manifest, half), None)  # a half-precision file builds the model
    assert torch.equal(built.state_dict()[FC1], model.state_dict()[FC1].half().float())


# ----------------------------------------------------------------------------------- making deltas
def test_a_structure_that_does_not_record_a_slicing_still_gives_a_delta_that_rebuilds(hubert_ckpt, padded_batch):
    """What is stored is decided by comparing with the sliced base: fc1 narrowed to its first 64 units and
    weight-pruned, described by the identity structure, has other shapes than the base's, so it is stored
    (its kept values too, although they equal the base's first rows)."""
    base = load_base(hubert_ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
    model.keep_units(1, list(range(64)))
    model.prune_weights(1, "fc1", keep_first((64, 64), 2000))
    identity = base_identity(str(hubert_ckpt), hubert_ckpt, base)
    delta = make_delta(base, identity, model, Structure.identity(base.config), {}, "narrowed")
    assert FC1 + VALUES_SUFFIX in delta.tensors
    rebuilt = apply_delta(delta, base)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------- slicing
def test_a_structure_naming_a_layer_the_base_lacks_is_refused(hubert_ckpt):
    base = load_base(hubert_ckpt)
    for sources in ([0, 2], [-1, 1]):
        structure = Structure([LayerOrigin(s) for s in sources])
        with pytest.raises(DeltaError, match=exactly(f"structure names base layers {sources}, but the base has 2")):
            slice_base(base, structure)


def test_slicing_leaves_the_base_and_its_config_as_they_were(hubert_ckpt):
    """Even a base whose layers carry masks (a weight-pruned model used as a base): removing a sublayer
    drops its masks from the sliced config only."""
    loaded = load_base(hubert_ckpt)
    model = SpeechTransformer.from_state_dict(loaded.config, loaded.state_dict)
    model.prune_weights(0, "q_proj", keep_first((64, 64), 100))
    model.prune_weights(1, "fc1", keep_first((128, 64), 100))
    base = Converted(model.config, model.state_dict(), loaded.source_format)
    config_before = copy.deepcopy(base.config)
    tensors_before = {k: v.clone() for k, v in base.state_dict.items()}
    structure = Structure.identity(base.config)
    structure.remove_attention(0)
    structure.remove_ffn(1)
    structure.keep_heads(1, [3], base_heads=4)
    sliced = slice_base(base, structure)
    assert "layers.0.attention.q_proj.mask" not in sliced and "layers.1.feed_forward.fc1.mask" not in sliced
    assert base.config == config_before
    assert base.state_dict.keys() == tensors_before.keys()
    assert all(torch.equal(base.state_dict[k], v) for k, v in tensors_before.items())


def test_slicing_shares_the_tensors_it_does_not_slice(hubert_ckpt):
    """The sliced base is read, never trained: tensors left whole are the base's own, not copies (a
    95M-parameter base is not held twice while a delta is made or applied)."""
    base = load_base(hubert_ckpt)
    structure = Structure.identity(base.config)
    structure.keep_heads(0, [1], base_heads=4)
    sliced = slice_base(base, structure)
    for name in ("encoder_norm.weight", "layers.1.attention.q_proj.weight", "feature_projection.weight"):
        assert sliced[name].data_ptr() == base.state_dict[name].data_ptr()


# -------------------------------------------------------------------------------- applying deltas
def test_apply_delta_messages_name_the_problem_exactly(hubert_ckpt):
    base = load_base(hubert_ckpt)
    model, delta = pruned_delta(hubert_ckpt, modify=True)
    with pytest.raises(DeltaError, match=exactly("this delta stores only what differs from its base: the base "
                                                 "checkpoint is needed")):
        apply_delta(delta, None)
    unknown = {f"extra.{i}": torch.zeros(1) for i in range(7)}
    with pytest.raises(DeltaError, match=exactly("delta tensors ['extra.0', 'extra.1', 'extra.2', 'extra.3', "
                                                 "'extra.4'] do not exist in the model its config describes")):
        apply_delta(Delta(delta.manifest, {**delta.tensors, **unknown}), base)


def test_a_tensor_of_the_wrong_shape_from_the_sliced_base_says_so(hubert_ckpt):
    """The structure says layer 0 keeps all heads, the config two: the sliced base's tensor is the wrong one."""
    base = load_base(hubert_ckpt)
    _, delta = pruned_delta(hubert_ckpt, modify=True)
    manifest = copy.deepcopy(delta.manifest)
    manifest["structure"]["layers"][0]["kept_heads"] = None
    with pytest.raises(DeltaError, match=r"^tensor layers\.0\.attention\.[kqv]_proj\.weight from the sliced base has "
                                         r"shape \(64, 64\), but the structure needs \(32, 64\)$"):
        apply_delta(Delta(manifest, delta.tensors), base)


# ---------------------------------------------------------------------- statistics files and bases
def stats_delta(tmp_path, **record):
    recorded = tmp_path / "made" / "mean_std.npy"
    recorded.parent.mkdir(exist_ok=True)
    recorded.write_bytes(b"statistics")
    base = tmp_path / "base" / "melhubert.ckpt"
    base.parent.mkdir(exist_ok=True)
    base.write_bytes(b"base")
    mean_std = {"file_name": "mean_std.npy", "path": str(recorded), "sha256": hashlib.sha256(b"statistics").hexdigest(),
                **record}
    return Delta({"base": {"name": "mel", "mean_std": mean_std}}, {}), recorded, base


def test_a_statistics_record_without_a_file_name_is_treated_as_one_with_an_empty_name(tmp_path):
    """The recorded name is what identifies the statistics file: without it (key absent or empty) nothing
    is taken, not even the recorded path."""
    for record in ({"file_name": ""}, {}):
        delta, recorded, base = stats_delta(tmp_path, **record)
        if not record:
            del delta.manifest["base"]["mean_std"]["file_name"]
        (base.parent / "None").write_bytes(b"statistics")  # what str(None) would name
        with pytest.raises(DeltaError, match="^cannot find the fbank mean/std file of this MelHuBERT delta's base"):
            delta_module.find_mean_std(delta, base, None, [recorded.parent])


def test_wrong_statistics_are_named_with_both_digests(tmp_path):
    delta, recorded, base = stats_delta(tmp_path)
    recorded.write_bytes(b"other statistics")
    actual = hashlib.sha256(b"other statistics").hexdigest()[:16]
    expected = hashlib.sha256(b"statistics").hexdigest()[:16]
    message = (f"fbank mean/std file {recorded} has sha256 {actual}..., but the delta was made with {expected}... "
               "(mean_std.npy); wrong statistics file")
    with pytest.raises(DeltaError, match=exactly(message)):
        delta_module.find_mean_std(delta, base)


def test_a_base_file_that_is_no_checkpoint_is_reported_with_the_loaders_message(tmp_path):
    base = tmp_path / "base.pt"
    torch.save({"not": "a checkpoint"}, base)
    with pytest.raises(CheckpointError) as loaders:
        load_base(base)
    delta = Delta({"base": {"name": "b", "sha256": delta_module.sha256_file(base)}}, {})
    with pytest.raises(DeltaError, match=exactly(str(loaders.value))):
        delta_module.build_compressed(delta, base)


# ------------------------------------------------------------------------------- digests and MACs
def test_the_tensor_digest_is_the_documented_sha256_so_files_verify_across_versions():
    """sha256 over the tensors in name order: name, dtype, shape, then the raw bytes (none for an empty one)."""
    x = torch.arange(3, dtype=torch.float32)
    expected = hashlib.sha256()
    for part in (b"a", b"torch.float32", b"[0]", b"", b"b", b"torch.float32", b"[3]", x.numpy().tobytes()):
        expected.update(part)
    assert delta_module._tensor_digest({"b": x, "a": torch.zeros(0)}) == expected.hexdigest()


def test_a_sparse_delta_records_its_effective_macs_for_the_recorded_duration(hubert_ckpt):
    from upstream_compressed.profile import count_effective_macs

    base, model, _ = weight_pruned(hubert_ckpt)
    identity = base_identity(str(hubert_ckpt), hubert_ckpt, base)
    macs = {"seconds": 1.0, "compressed": 123}
    delta = make_delta(base, identity, model, Structure.identity(base.config), {}, "wp", extra={"macs": macs})
    effective = count_effective_macs(model, 1.0)
    assert effective != count_effective_macs(model)  # the default duration is another one
    assert delta.manifest["macs"] == {"seconds": 1.0, "compressed": 123, "compressed_effective": effective}
