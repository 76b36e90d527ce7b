"""Weight pruning: masks by magnitude, exact zeros through recovery, compact sparse deltas, sparse
kernels equal to the masked dense model, effective MACs, and the weightpruned upstreams."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save

from upstream_compressed import delta as delta_module
from upstream_compressed.compress import STEPS, StepContext, base_identity, run_recipe
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
from upstream_compressed.model import LINEAR_NAMES, SpeechTransformer
from upstream_compressed.model.convert import load_base
from upstream_compressed.model.layers import factorize
from upstream_compressed.model import sparse
from upstream_compressed.model.sparse import (
    CPU_CALIBRATE_FROM, EXECUTION_ENV, MaskedLinear, is_two_four, masked_linears,
)
from upstream_compressed.profile import count_effective_macs, count_macs, count_nonzero_parameters
from upstream_compressed.recipe import RecipeError, parse_recipe
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint
from upstream_compressed.train.distill import TrainOptions, train_distillation

from helpers import max_valid_difference, run_model
from test_profile import analytic_macs


def pruned(ckpt, *steps: dict) -> tuple[SpeechTransformer, Structure, object]:
    """The base model after ``steps`` run directly (no recipe, no MAC counting)."""
    base = load_base(ckpt)
    model = SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()
    structure = Structure.identity(base.config)
    for i, step in enumerate(steps):
        model, structure = STEPS[step["method"]](model, structure, step, StepContext(base, Path("."), i, origin={}))
    return model.eval(), structure, base


def masked(model: SpeechTransformer) -> list[MaskedLinear]:
    return [model.linear(i, n) for i in range(model.config.num_layers) for n in LINEAR_NAMES
            if isinstance(model.linear(i, n), MaskedLinear)]


def wp(**options) -> dict:
    return {"method": "weight_pruning", **options}


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("step,message", [
    (wp(), r"steps\[0\].sparsity is missing"),
    (wp(sparsity=1.0), r"steps\[0\].sparsity: 1.0 is outside"),
    (wp(sparsity=0), r"steps\[0\].sparsity: 0 prunes nothing"),
    (wp(sparsity="90%"), r"steps\[0\].sparsity: expected a number"),
    (wp(sparsity=0.5, selection="random"), r"steps\[0\].selection: 'random'"),
    (wp(sparsity=0.5, pattern="4:8"), r"steps\[0\].pattern: '4:8'"),
    (wp(sparsity=0.9, pattern="2:4"), r"steps\[0\].sparsity: pattern 2:4 prunes exactly 0.5"),
    (wp(pattern="2:4", selection="global"), r"steps\[0\].selection: does not apply to pattern 2:4"),
    (wp(sparsity=0.5, targets=["conv"]), r"steps\[0\].targets: unknown target 'conv'"),
    (wp(sparsity=0.5, ratio=0.5), r"steps\[0\]: unknown option\(s\) \['ratio'\]"),
    (wp(sparsity=0.5, recovery={"steps": 3}), r"steps\[0\].recovery: expected a mapping with at least `audio"),
])
def test_bad_options_are_refused_naming_the_field(step, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"base": "b.pt", "steps": [step]})


def test_unquoted_yaml_2_4_means_the_pattern():
    recipe = yaml.safe_load("base: b.pt\nsteps:\n  - {method: weight_pruning, pattern: 2:4}\n")
    assert recipe["steps"][0]["pattern"] == 124  # YAML 1.1 base 60
    parse_recipe(recipe)


# --------------------------------------------------------------------------------- the masks
def test_global_pruning_removes_the_smallest_magnitudes_to_the_exact_sparsity(hubert_ckpt):
    model, _, base = pruned(hubert_ckpt, wp(sparsity=0.7))
    linears = masked(model)
    assert len(linears) == 2 * 6 and all(layer.sparse == list(LINEAR_NAMES) for layer in model.config.layers)
    total = sum(m.mask.numel() for m in linears)
    kept = sum(int(m.mask.sum()) for m in linears)
    assert total - kept == round(0.7 * total)
    reference = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    dense = [reference.linear(i, n).weight.detach().abs() for i in range(2) for n in LINEAR_NAMES]
    pruned_magnitudes = torch.cat([w[~m.mask] for w, m in zip(dense, linears)])
    kept_magnitudes = torch.cat([w[m.mask] for w, m in zip(dense, linears)])
    assert pruned_magnitudes.max() <= kept_magnitudes.min()  # one threshold over all Linears
    for m in linears:
        assert torch.all(m.weight[~m.mask] == 0)
    # biases and everything outside the encoder Linears are untouched
    state = model.state_dict()
    for name, tensor in reference.state_dict().items():
        if not name.endswith("weight") or not any(f".{n}." in name for n in LINEAR_NAMES):
            assert torch.equal(state[name], tensor), name


def test_per_layer_pruning_gives_every_targeted_linear_the_sparsity(hubert_ckpt):
    model, _, _ = pruned(hubert_ckpt, wp(sparsity=0.6, selection="per_layer", targets=["ffn", "q_proj"], layers=[1]))
    assert model.config.layers[0].sparse == [] and sorted(model.config.layers[1].sparse) == ["fc1", "fc2", "q_proj"]
    for m in masked(model):
        assert int((~m.mask).sum()) == round(0.6 * m.mask.numel())


def test_iterative_masks_only_grow(hubert_ckpt):
    first, _, _ = pruned(hubert_ckpt, wp(sparsity=0.5))
    both, _, _ = pruned(hubert_ckpt, wp(sparsity=0.5), wp(sparsity=0.8, selection="per_layer"))
    for a, b in zip(masked(first), masked(both)):
        assert not torch.any(b.mask & ~a.mask)  # nothing pruned before comes back
        assert int((~b.mask).sum()) == round(0.8 * b.mask.numel())
    again, _, _ = pruned(hubert_ckpt, wp(sparsity=0.8), wp(sparsity=0.3))  # lower target: nothing revived
    assert sum(int((~m.mask).sum()) for m in masked(again)) == round(0.8 * sum(m.mask.numel() for m in masked(again)))


def test_two_four_pattern_keeps_the_two_largest_of_every_four(hubert_ckpt):
    model, _, base = pruned(hubert_ckpt, wp(pattern="2:4"))
    reference = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    for (i, name), m in zip([(i, n) for i in range(2) for n in LINEAR_NAMES], masked(model)):
        groups = m.mask.view(m.out_features, -1, 4)
        assert is_two_four(m.mask) and torch.all(groups.sum(-1) == 2)
        weight = reference.linear(i, name).weight.abs().view(m.out_features, -1, 4)
        assert torch.all(weight[~groups].view(m.out_features, -1, 2).max(-1).values
                         <= weight[groups].view(m.out_features, -1, 2).min(-1).values)


# ---------------------------------------------------------------------- exact zeros in training
def test_pruned_weights_stay_exactly_zero_through_recovery_training(tmp_path, hubert_ckpt, audio_dir):
    model, _, base = pruned(hubert_ckpt, wp(sparsity=0.8, selection="per_layer"))
    before = {id(m): m.weight.detach().clone() for m in masked(model)}
    teacher = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    # AdamW with weight decay and a high learning rate: pruned weights get exactly zero gradients
    options = TrainOptions(audio=str(audio_dir), steps=1, batch_size=2, max_seconds=0.6, lr=1e-2, weight_decay=0.1,
                           warmup_steps=1)
    train_distillation(model, teacher, options, tmp_path / "train.pt")
    for m in masked(model):
        assert torch.all(m.weight[~m.mask] == 0)
        assert not torch.equal(m.weight[m.mask], before[id(m)][m.mask])  # the kept weights did train

    # and through an iterative recipe with recovery, down to the delta and the rebuilt model
    recovery = {"audio": str(audio_dir), "steps": 1, "batch_size": 2, "max_seconds": 0.6, "lr": 1e-2}
    delta = run_recipe(parse_recipe({"base": str(hubert_ckpt), "steps": [
        wp(sparsity=0.5, recovery=recovery), wp(sparsity=0.8, recovery=recovery),
    ]}))
    assert delta.technique == "weightpruned"
    rebuilt = apply_delta(read_delta(write_delta(delta, tmp_path / "r.safetensors")), load_base(hubert_ckpt))
    linears = masked(rebuilt)
    stored = [name for name in delta.tensors if name.endswith(".__values")]
    assert len(stored) == sum(m.num_pruned < m.mask.numel() for m in linears)  # recovery changed all kept values
    assert all(torch.all(m.weight[~m.mask] == 0) for m in linears)
    assert sum(m.num_pruned for m in linears) == round(0.8 * sum(m.mask.numel() for m in linears))


# ----------------------------------------------------------------------------- the delta format
def delta_of(ckpt, model, structure, base):
    return make_delta(base, base_identity(str(ckpt), Path(ckpt), base), model, structure, {}, "weightpruned")


def test_pruning_without_recovery_stores_mask_bits_only(tmp_path, hubert_ckpt, padded_batch):
    model, structure, base = pruned(hubert_ckpt, wp(sparsity=0.9))
    delta = delta_of(hubert_ckpt, model, structure, base)
    assert all(name.endswith(".__mask") and t.dtype == torch.uint8 for name, t in delta.tensors.items())
    assert len(delta.tensors) == 12
    assert delta.manifest["format_version"] == 2
    summary = delta.manifest["sparsity"]
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-4) and "biases" in summary["scope"]
    assert summary["params_nonzero"] == count_nonzero_parameters(model)
    rebuilt, _ = load_compressed(write_delta(delta, tmp_path / "d.safetensors"), hubert_ckpt)
    assert rebuilt.config == model.config
    model.set_sparse_execution("dense")
    rebuilt.set_sparse_execution("dense")
    expected, mask = run_model(model, padded_batch)
    states, _ = run_model(rebuilt, padded_batch)
    for a, b in zip(states, expected):
        assert max_valid_difference(a, b, mask) == 0


def test_changed_values_are_stored_and_rebuilt(tmp_path, hubert_ckpt):
    model, structure, base = pruned(hubert_ckpt, wp(sparsity=0.5), {"method": "head_pruning", "ratio": 0.5})
    fc1 = model.linear(1, "fc1")
    with torch.no_grad():
        fc1.weight.mul_(1.5)
    model.replace_linear(0, "fc2", factorize(model.linear(0, "fc2"), 8))  # low-rank after pruning: dense again
    assert "fc2" not in model.config.layers[0].sparse
    delta = delta_of(hubert_ckpt, model, structure, base)
    assert sorted(n for n in delta.tensors if n.endswith(".__values")) == ["layers.1.feed_forward.fc1.weight.__values"]
    rebuilt, _ = load_compressed(write_delta(delta, tmp_path / "d.safetensors"), hubert_ckpt)
    for (name, tensor), (other, rebuilt_tensor) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert name == other and torch.equal(tensor, rebuilt_tensor), name
    assert model.linear(0, "q_proj").mask.shape == (32, 64)  # head pruning sliced the mask with the rows


def test_dense_deltas_keep_format_version_1(hubert_ckpt):
    model, structure, base = pruned(hubert_ckpt, {"method": "head_pruning", "ratio": 0.5})
    delta = delta_of(hubert_ckpt, model, structure, base)
    assert delta.manifest["format_version"] == 1 and "sparse_tensors" not in delta.manifest
    assert all("sparse" not in layer for layer in delta.manifest["config"]["layers"])


def rewrite(path: Path, manifest: dict, tensors: dict) -> None:
    """A well-formed file (valid checksums) holding a manifest and tensors of our choosing."""
    manifest["tensors_sha256"] = delta_module._tensor_digest(tensors)
    text = json.dumps(manifest)
    metadata = {MANIFEST_KEY: text, MANIFEST_DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}
    path.write_bytes(save(tensors, metadata=metadata))


@pytest.fixture
def sparse_delta_file(tmp_path, hubert_ckpt):
    model, structure, base = pruned(hubert_ckpt, wp(sparsity=0.9, selection="per_layer"))
    with torch.no_grad():
        model.linear(0, "fc1").weight.mul_(2.0)
    return write_delta(delta_of(hubert_ckpt, model, structure, base), tmp_path / "sparse.safetensors")


FC1 = "layers.0.feed_forward.fc1.weight"


def _values_short(manifest, tensors):
    tensors[FC1 + ".__values"] = tensors[FC1 + ".__values"][:-1].clone()


def _mask_short(manifest, tensors):
    tensors[FC1 + ".__mask"] = tensors[FC1 + ".__mask"][:-1].clone()


def _shape_wrong(manifest, tensors):
    manifest["sparse_tensors"][FC1]["shape"] = [64, 128]


def _mask_missing(manifest, tensors):
    del tensors[FC1 + ".__mask"]


def _not_masked(manifest, tensors):
    manifest["config"]["layers"][0]["sparse"].remove("fc1")


def _dense_and_sparse(manifest, tensors):
    tensors[FC1] = torch.zeros(128, 64)


def _old_version(manifest, tensors):
    manifest["format_version"] = 1


def _orphan_bits(manifest, tensors):
    tensors["layers.0.feed_forward.fc9.weight.__mask"] = torch.zeros(4, dtype=torch.uint8)


@pytest.mark.parametrize("tamper,message", [
    (_values_short, f"{FC1} has 818 kept values but its mask keeps 819"),
    (_mask_short, r"packed mask of shape \(128, 64\) needs 1024 uint8"),
    (_shape_wrong, r"has shape \[64, 128\], but the structure needs \(128, 64\)"),
    (_mask_missing, "has no mask"),
    (_not_masked, "is not a masked Linear weight"),
    (_dense_and_sparse, "stored both dense and sparse"),
    (_old_version, "sparse tensors need format version 2"),
    (_orphan_bits, "fc9.weight.__mask"),
])
def test_bad_sparse_tensors_are_refused(sparse_delta_file, hubert_ckpt, tamper, message):
    delta = read_delta(sparse_delta_file)
    manifest, tensors = json.loads(json.dumps(delta.manifest)), dict(delta.tensors)
    tamper(manifest, tensors)
    rewrite(sparse_delta_file, manifest, tensors)
    with pytest.raises(DeltaError, match=message):
        load_compressed(sparse_delta_file, hubert_ckpt)


def test_flipped_bit_in_a_packed_mask_is_refused(sparse_delta_file, hubert_ckpt):
    data = bytearray(sparse_delta_file.read_bytes())
    data[-3] ^= 0x10
    sparse_delta_file.write_bytes(bytes(data))
    with pytest.raises(DeltaError, match="corrupted"):
        load_compressed(sparse_delta_file, hubert_ckpt)


# ------------------------------------------------------------------------------ sparse execution
@pytest.fixture
def calibration_says_csr(monkeypatch):
    """auto's calibration decides without timing: CSR wins (on the tiny model's shapes dense would)."""
    monkeypatch.setattr(sparse, "calibration_timer", lambda runs: {"dense": [2.0], "csr": [1.0]})


def test_sparse_kernels_equal_the_masked_dense_model(hubert_ckpt, padded_batch, monkeypatch, calibration_says_csr):
    model, _, _ = pruned(hubert_ckpt, wp(sparsity=0.9, selection="per_layer"))
    assert set(model.set_sparse_execution("dense").values()) == {"dense"}
    expected, mask = run_model(model, padded_batch)
    assert set(model.set_sparse_execution("auto").values()) == {"csr"}  # where the calibration found CSR faster
    states, _ = run_model(model, padded_batch)
    for a, b in zip(states, expected):
        assert max_valid_difference(a, b, mask) < 1e-4
    with torch.enable_grad():  # autograd on: the differentiable masked product, whatever the mode
        lengths = torch.tensor([len(w) for w in padded_batch])
        grad_states, _ = model(torch.nn.utils.rnn.pad_sequence(padded_batch, batch_first=True), lengths)
    assert all(max_valid_difference(a.detach(), b, mask) < 1e-4 for a, b in zip(grad_states, expected))

    half, _, _ = pruned(hubert_ckpt, wp(sparsity=0.5, selection="per_layer"))
    monkeypatch.setattr(sparse, "calibration_timer", lambda runs: {"dense": [1.0], "csr": [2.0]})
    assert set(half.set_sparse_execution(None).values()) == {"dense"}  # auto: where the calibration found dense faster
    monkeypatch.setenv(EXECUTION_ENV, "sparse")
    assert set(half.set_sparse_execution(None).values()) == {"csr"}
    assert set(half.set_sparse_execution("dense").values()) == {"dense"}  # explicit beats the environment
    monkeypatch.setenv(EXECUTION_ENV, "fast")
    with pytest.raises(ValueError, match=f"{EXECUTION_ENV}: 'fast' is not one of auto|dense|sparse"):
        half.set_sparse_execution(None)


def test_kernels_follow_weight_changes(hubert_ckpt, padded_batch):
    model, _, _ = pruned(hubert_ckpt, wp(sparsity=0.9))
    model.set_sparse_execution("sparse")
    run_model(model, padded_batch)
    with torch.no_grad():
        for m in masked(model):
            m.weight.mul_(-1)
    flipped, mask = run_model(model, padded_batch)
    model.set_sparse_execution("dense")
    expected, _ = run_model(model, padded_batch)
    assert all(max_valid_difference(a, b, mask) < 1e-4 for a, b in zip(flipped, expected))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need a CUDA GPU")
def test_two_four_runs_on_semi_structured_kernels_on_cuda(hubert_ckpt):
    model, _, _ = pruned(hubert_ckpt, wp(pattern="2:4"))
    model = model.cuda().half()
    wav = torch.randn(2, 16000, device="cuda", dtype=torch.half)
    model.set_sparse_execution("dense")
    with torch.no_grad():
        expected, _ = model(wav)
    assert set(model.set_sparse_execution("auto").values()) == {"dense"}  # measured: 2:4 loses on an H200
    assert set(model.set_sparse_execution("sparse").values()) == {"semi_structured"}
    with torch.no_grad():
        states, _ = model(wav)
    for a, b in zip(states, expected):
        assert (a - b).abs().max().item() < 5e-2  # fp16


# ----------------------------------------------------------------------------------------- MACs
def test_effective_macs_equal_the_analytic_count(hubert_ckpt):
    model, _, _ = pruned(hubert_ckpt, wp(sparsity=0.7, targets=["attention", "fc2"]),
                         {"method": "head_pruning", "ratio": 0.5})
    samples = 52_800
    frames = samples
    for _, kernel, stride in model.config.conv_layers:
        frames = (frames - kernel) // stride + 1
    zeros = sum(int((~m.mask).sum()) for m in masked(model))
    model.set_sparse_execution("sparse")  # the count must not depend on the kernels
    assert count_macs(model, 3.3) == analytic_macs(model.config, samples)
    assert count_effective_macs(model, 3.3) == analytic_macs(model.config, samples) - frames * zeros


# ------------------------------------------------------------------------------------- upstreams
@pytest.mark.parametrize("family", ["hubert", "distilhubert"])
def test_weightpruned_upstreams_load_deltas_through_the_hub(tmp_path, s3prl_hub, hubert_ckpt, distiller_ckpt,
                                                          padded_batch, family, calibration_says_csr):
    ckpt = hubert_ckpt if family == "hubert" else distiller_ckpt
    recipe = tmp_path / "wp.yaml"
    recipe.write_text(f"base: {ckpt}\nsteps:\n  - {{method: weight_pruning, sparsity: 0.9}}\n")
    delta = run_recipe(parse_recipe(yaml.safe_load(recipe.read_text()), recipe))
    assert delta.manifest["macs"]["compressed_effective"] < delta.manifest["macs"]["compressed"]
    path = write_delta(delta, tmp_path / "wp.safetensors")
    entry = getattr(s3prl_hub, f"{family}_weightpruned")
    upstream = entry(ckpt=str(path))
    kernels = {m.kernel_name() for _, m in upstream.model.named_modules() if isinstance(m, MaskedLinear)}
    assert "csr" in kernels
    with torch.no_grad():
        result = upstream(padded_batch)
    options = tmp_path / "options.yaml"
    options.write_text("sparse_execution: dense\n")
    dense = entry(ckpt=str(path), model_config=str(options))
    assert {m.kernel_name() for _, m in dense.model.named_modules() if isinstance(m, MaskedLinear)} == {"dense"}
    with torch.no_grad():
        expected = dense(padded_batch)
    padding = ~expected["pad_mask"]
    for a, b in zip(result["hidden_states"], expected["hidden_states"]):
        assert max_valid_difference(a, b, padding) < 1e-4

    options.write_text("sparse_execution: quick\n")
    with pytest.raises(DeltaError, match="sparse_execution: 'quick' is not one of"):
        entry(ckpt=str(path), model_config=str(options))
    with pytest.raises(DeltaError, match="technique 'weightpruned'"):
        getattr(s3prl_hub, f"{family}_headpruned")(ckpt=str(path))


# ------------------------------------------------------------------------- HuBERT Base shape
def test_hubert_base_delta_at_90_percent_is_small_and_runs_sparse(tmp_path, calibration_says_csr):
    ckpt = make_hubert_checkpoint(tmp_path / "base.pt", layers=12, dim=768, ffn=3072, heads=12,
                                  conv_layers="[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
                                  conv_pos=128, conv_pos_groups=16)
    model, structure, base = pruned(ckpt, wp(sparsity=0.9))
    with torch.no_grad():  # as after recovery: every kept value differs from the base and is stored
        for m in masked(model):
            m.weight.mul_(1.01)
    path = write_delta(delta_of(ckpt, model, structure, base), tmp_path / "wp90.safetensors")
    ratio = os.path.getsize(path) / os.path.getsize(ckpt)
    assert ratio < 0.15, f"delta is {ratio:.1%} of the dense checkpoint"  # 10.6 MB bits + 34 MB values
    rebuilt, _ = load_compressed(path, ckpt)
    wav = [torch.randn(8000, generator=torch.Generator().manual_seed(1))]
    kernels = rebuilt.set_sparse_execution("auto")  # global selection: Linears differ in sparsity
    assert kernels == {name: "csr" if m.sparsity >= CPU_CALIBRATE_FROM else "dense"
                       for name, m in masked_linears(rebuilt)}
    assert "csr" in kernels.values()
    states, mask = run_model(rebuilt, wav)
    model.set_sparse_execution("dense")
    expected, _ = run_model(model, wav)
    for a, b in zip(states, expected):
        assert max_valid_difference(a, b, mask) < 1e-4
