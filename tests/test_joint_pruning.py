"""Joint distillation + structured pruning (DPHuBERT): hard-concrete gates, the gated model equal to the
physically pruned one, expected sizes, targets met after a short run, exact resume, validation."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from upstream_compressed.compress import WORK_FILE, joint_pruning, run_recipe
from upstream_compressed.delta import Structure, apply_delta, slice_base
from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import load_base
from upstream_compressed.model.costs import mac_count, parameter_count
from upstream_compressed.profile import count_macs
from upstream_compressed.recipe import RecipeError, parse_recipe, technique_name
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint
from upstream_compressed.train.gates import Gates, HardConcrete, SizeConstraint, choose_structure, fold_and_prune, gated

from helpers import max_valid_difference, run_model


def model_of(ckpt) -> tuple[SpeechTransformer, object]:
    base = load_base(ckpt)
    return SpeechTransformer.from_state_dict(base.config, base.state_dict).eval(), base


# ------------------------------------------------------------------------------ hard concrete
def test_hard_concrete_samples_probabilities_and_deterministic_masks():
    torch.manual_seed(0)
    gate = HardConcrete(1000, initial_drop=0.5)
    samples = gate.train()()
    assert samples.min() >= 0 and samples.max() <= 1
    assert (samples == 0).any() and (samples == 1).any(), "the stretch must give exact zeros and ones"
    probability = gate.probability_nonzero()
    assert ((probability >= 0) & (probability <= 1)).all()
    assert abs(probability.mean().item() - (samples > 0).float().mean().item()) < 0.05  # P(z > 0) is what it says
    probability.sum().backward()
    assert gate.log_alpha.grad is not None and (gate.log_alpha.grad > 0).all()

    gate.eval()
    assert torch.equal(gate(), gate()), "eval mode must be deterministic"
    assert (gate() > 0).sum().item() == round(gate.expected_count().item())
    with torch.no_grad():
        gate.log_alpha.fill_(100.0)
    assert gate.expected_count().item() == 1000 and torch.equal(gate(), torch.ones(1000))
    with torch.no_grad():
        gate.log_alpha.fill_(-100.0)
    assert gate.expected_count().item() == 0 and torch.equal(gate(), torch.zeros(1000))


def test_lagrangian_multipliers_ascend_and_gates_descend(hubert_ckpt):
    model, _ = model_of(hubert_ckpt)
    gates = Gates(model.config, ["heads", "ffn"])
    full = model.num_parameters()
    constraint = SizeConstraint(gates, "params", full // 2, warmup_steps=0, gate_lr=0.1, lagrangian_lr=0.1)
    optimizer = torch.optim.SGD(constraint.param_groups(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        constraint(step=10).backward()
        optimizer.step()
    expected = constraint.expected_size().item()
    assert expected > full // 2
    assert constraint.lambdas[0].item() > 0, "l1 must grow while the expected size is above the target"
    assert constraint.lambdas[1].item() > 0, "l2 multiplies a square: ascent always increases it"
    before = [g.log_alpha.detach().clone() for g in gates.gates.values()]
    optimizer.zero_grad()
    constraint(step=10).backward()
    optimizer.step()
    assert constraint.expected_size().item() < expected, "the gates must close to shrink the model"
    assert all((g.log_alpha <= b).all() for g, b in zip(gates.gates.values(), before))
    ramped = SizeConstraint(gates, "params", full // 2, warmup_steps=10, gate_lr=0.1, lagrangian_lr=0.1)
    assert ramped.target_at(0) == full and ramped.target_at(5) == (full + full // 2) / 2
    assert ramped.target_at(10) == ramped.target_at(99) == full // 2


# --------------------------------------------------------------- gated model = pruned model
def soft_gates(gates: Gates, generator: torch.Generator) -> None:
    """log_alpha spread so that some groups close and the kept ones carry gate values below 1."""
    with torch.no_grad():
        for gate in gates.gates.values():
            if gate.n == 1:
                gate.log_alpha.fill_(-20.0 if torch.rand((), generator=generator) < 0.5 else 0.7)
            else:
                gate.log_alpha.copy_(torch.linspace(-8.0, 3.0, gate.n)[torch.randperm(gate.n, generator=generator)])


@pytest.fixture(scope="module")
def layer_norm_ckpt(tmp_path_factory):
    return make_hubert_checkpoint(tmp_path_factory.mktemp("ln") / "ln.pt", extractor_mode="layer_norm",
                                  layer_norm_first=True)


CASES = {  # id: (checkpoint fixture, structures)
    "conv": ("hubert_ckpt", ["conv"]),
    "conv-layer-norm-mode": ("layer_norm_ckpt", ["conv"]),
    "conv-no-feature-norm": ("distiller_ckpt", ["conv"]),
    "heads": ("hubert_ckpt", ["heads"]),
    "ffn": ("hubert_ckpt", ["ffn"]),
    "attention-layers": ("hubert_ckpt", ["attention_layers", "heads"]),
    "ffn-layers": ("layer_norm_ckpt", ["ffn_layers", "ffn"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gated_model_equals_the_physically_pruned_one(request, padded_batch, case):
    fixture, structures = CASES[case]
    ckpt = request.getfixturevalue(fixture)
    model, base = model_of(ckpt)
    gates = Gates(model.config, structures).eval()
    soft_gates(gates, torch.Generator().manual_seed(len(case)))
    kept = {key.name: gates.gate(key).deterministic_kept() for key in gates.keys}
    assert any(len(k) < gates.gates[name].n for name, k in kept.items()), "some group must be closed"
    with gated(model, gates):
        gated_states, mask = run_model(model, padded_batch)
    magnitudes = torch.cat([gates.gate(key)()[kept[key.name]] for key in gates.keys])
    assert (magnitudes < 0.99).any(), "kept gate values below 1 must be folded into the weights"

    pruned = copy.deepcopy(model)
    structure = Structure.identity(base.config)
    fold_and_prune(pruned, structure, gates, kept, base.config)
    states, pruned_mask = run_model(pruned, padded_batch)
    assert torch.equal(mask, pruned_mask)
    for a, b in zip(gated_states, states):
        assert max_valid_difference(a, b, mask) < 1e-5
    assert pruned.num_parameters() < model.num_parameters()
    assert pruned.num_parameters() == parameter_count(base.config, gates.counts(kept))
    assert count_macs(pruned, 1.0) == mac_count(base.config, 1.0, gates.counts(kept))

    # The structure rebuilds the same model from the base (what a delta records).
    sliced = slice_base(base, structure)
    assert sorted(sliced) == sorted(pruned.state_dict())
    assert all(sliced[k].shape == v.shape for k, v in pruned.state_dict().items())


def test_expected_size_with_open_gates_is_the_models(hubert_ckpt):
    model, _ = model_of(hubert_ckpt)
    gates = Gates(model.config, ["conv", "heads", "ffn", "attention_layers", "ffn_layers"])
    with torch.no_grad():
        for gate in gates.gates.values():
            gate.log_alpha.fill_(100.0)
    params = SizeConstraint(gates, "params", 1, 0, 0.1, 0.1)
    macs = SizeConstraint(gates, "macs", 1, 0, 0.1, 0.1, seconds=10.0)
    assert params.expected_size().item() == pytest.approx(model.num_parameters(), rel=1e-6)
    assert macs.expected_size().item() == pytest.approx(count_macs(model, 10.0), rel=1e-6)
    assert params.full == model.num_parameters() and macs.full == count_macs(model, 10.0)


@pytest.mark.parametrize("measure,tolerance", [("params", 0.01), ("macs", 0.02)])
def test_structure_choice_reaches_the_band_from_untrained_gates(hubert_ckpt, measure, tolerance):
    """What completes a run that stopped short: from the initial gates straight to the target."""
    model, _ = model_of(hubert_ckpt)
    gates = Gates(model.config, ["conv", "heads", "ffn", "attention_layers"])
    full = model.num_parameters() if measure == "params" else count_macs(model, 10.0)
    for fraction in (0.35, 0.6, 0.93):
        constraint = SizeConstraint(gates, measure, fraction * full, 0, 0.1, 0.1)
        kept, size = choose_structure(constraint, tolerance)
        assert abs(size - fraction * full) <= tolerance * fraction * full
        assert size == constraint.size(gates.counts(kept))
        assert all(len(kept[key.name]) >= 1 for key in gates.keys if key.kind == "conv")


# ------------------------------------------------------------------------------- recipe runs
def training(audio_dir, **extra) -> dict:
    return {"audio": str(audio_dir), "steps": 4, "batch_size": 2, "max_seconds": 0.5, "lr": 1e-3,
            "checkpoint_every": 2, "device": "cpu", **extra}


def joint_step(audio_dir, final: bool = True, **extra) -> dict:
    step = {"method": "joint_pruning", "structures": ["conv", "heads", "ffn"], "target_warmup_steps": 2,
            "gate_lr": 0.05, **training(audio_dir), **extra}
    if final:
        step["final_distillation"] = training(audio_dir, seed=1)
    return step


@pytest.mark.parametrize("target", [{"target_params": 75_000}, {"target_macs": 150_000_000}],
                         ids=["params", "macs"])
def test_a_short_run_meets_the_target(hubert_ckpt, audio_dir, target):
    recipe = parse_recipe({"base": str(hubert_ckpt), "steps": [
        joint_step(audio_dir, final=False, steps=3, structures=["conv", "heads", "ffn", "ffn_layers"], **target)]})
    delta = run_recipe(recipe)
    model = apply_delta(delta, load_base(hubert_ckpt))
    if "target_params" in target:
        assert abs(model.num_parameters() - 75_000) <= 750
        assert delta.manifest["params"]["compressed"] == model.num_parameters()
    else:
        assert abs(count_macs(model, 10.0) - 150_000_000) <= 3_000_000
        assert delta.manifest["macs"]["compressed"] == count_macs(model, 10.0)
    assert technique_name(recipe.steps) == "jointpruned"


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, hubert_ckpt, audio_dir):
    recipe = parse_recipe({"base": str(hubert_ckpt), "steps": [joint_step(audio_dir, target_params=80_000)]})
    return recipe, run_recipe(recipe, work_dir=tmp_path_factory.mktemp("uninterrupted"))


@pytest.mark.parametrize("phase", [0, 1], ids=["joint", "final"])
def test_interrupted_run_resumes_to_the_same_delta(tmp_path, uninterrupted, monkeypatch, capfd, phase):
    """Stopped after a training checkpoint of either phase, a rerun continues there and ends identical."""
    recipe, expected = uninterrupted

    real, calls = joint_pruning.train_distillation, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) - 1 == phase:  # the joint phase is the first training, the final distillation the second
            real(*args, stop_after=lambda done: done >= 2, **kwargs)
            raise Killed
        return real(*args, **kwargs)

    work = tmp_path / "work"
    monkeypatch.setattr(joint_pruning, "train_distillation", interrupted)
    with pytest.raises(Killed):
        run_recipe(recipe, work_dir=work)
    monkeypatch.undo()
    assert (work / ("step-0-training.pt" if phase == 0 else "step-0-final.pt")).is_file()
    torch.manual_seed(1234)  # whatever this process drew before
    capfd.readouterr()
    resumed = run_recipe(recipe, work_dir=work)
    messages = capfd.readouterr().err
    if phase == 0:
        assert re.search(r"training: step 0 joint pruning start=2 end=4", messages), messages
    else:
        assert re.search(r"training: step 0 joint pruning start=4 end=4", messages), messages
        assert re.search(r"training: step 0 final distillation start=2 end=4", messages), messages
    assert resumed.manifest == expected.manifest
    assert sorted(resumed.tensors) == sorted(expected.tensors)
    for name, tensor in expected.tensors.items():
        assert torch.allclose(resumed.tensors[name], tensor, atol=1e-6, rtol=0), name
    assert all(WORK_FILE.fullmatch(p.name) for p in work.iterdir()), "cleaning must know every work file"


# --------------------------------------------------------------------------------- validation
BAD = [
    ({"target_macs": 1e8}, "exactly one of target_params"),
    ({"target_params": None}, r"\.target_params: expected a positive number"),
    ({"target_params": "23M"}, r"\.target_params: expected a positive number"),
    ({"structures": ["heads", "rows"]}, r"\.structures: unknown \['rows'\]"),
    ({"structures": "heads"}, r"\.structures: expected a non-empty list"),
    ({"structures": []}, r"\.structures: expected a non-empty list"),
    ({"gate_lr": -1}, r"\.gate_lr: expected a positive number"),
    ({"lagrangian_lr": "fast"}, r"\.lagrangian_lr: expected a positive number"),
    ({"target_warmup_steps": 1.5}, r"\.target_warmup_steps: expected a non-negative integer"),
    ({"recovery": {"audio": "x"}}, r"\.recovery: joint pruning trains already"),
    ({"final_distillation": {"steps": 3}}, r"\.final_distillation: expected a mapping with at least `audio"),
    ({"final_distillation": {"audio": "x", "stepz": 3}}, r"\.final_distillation: unknown training option"),
    ({"target_sparsity": 0.75}, r"unknown training option\(s\) \['target_sparsity'\]"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m for _, m in BAD])
def test_invalid_options_are_refused_naming_the_field(audio_dir, change, message):
    step = {**joint_step(audio_dir, final=False, target_params=80_000), **change}
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"base": "x.pt", "steps": [step]})


@pytest.mark.parametrize("target,message", [
    (10**9, r"steps\[0\]\.target_params: 1,000,000,000 is outside what pruning .* up to, not including, its size"),
    (10, r"steps\[0\]\.target_params: 10 is outside .* from [\d,]+ \(everything prunable removed\)"),
])
def test_unreachable_targets_are_refused_before_training(hubert_ckpt, audio_dir, capfd, target, message):
    recipe = parse_recipe({"base": str(hubert_ckpt), "steps": [joint_step(audio_dir, target_params=target)]})
    with pytest.raises(RecipeError, match=message):
        run_recipe(recipe)
    assert "training:" not in capfd.readouterr().err


def test_default_layer_pairs_are_dphuberts(hubert_ckpt):
    model, _ = model_of(hubert_ckpt)
    assert joint_pruning.dphubert_pairs(model, model) == [[0, 0], [1, 1], [2, 2]]
    deep = copy.deepcopy(model)
    deep.config.layers = deep.config.layers * 6  # 12 layers: only the config is read
    assert joint_pruning.dphubert_pairs(deep, deep) == [[0, 0], [4, 4], [8, 8], [12, 12]]
    assert math.isclose(joint_pruning.GATE_LR, 0.02) and math.isclose(joint_pruning.LAGRANGIAN_LR, 0.02)
