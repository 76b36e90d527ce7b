"""Temporal relation distillation (``objective: temporal_relation``, STaRHuBERT's temporal Gram matrices)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.nn.utils.rnn import pad_sequence

from upstream_compressed.cli import main
from upstream_compressed.compress import STEPS, StepContext
from upstream_compressed.delta import Structure, apply_delta, read_delta
from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import load_base
from upstream_compressed.recipe import RecipeError, parse_recipe
from upstream_compressed.train.temporal_relation import intra_layer_pairs, temporal_relation_loss

LENGTHS = (20, 13, 7)
PAIRS = [[0, 0], [1, 2], [2, 4]]  # student HuBERT layout with 2 layers, teacher with 4


def mask_of(lengths=LENGTHS) -> torch.Tensor:
    return torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]


def random_states(count: int, width: int, seed: int, lengths=LENGTHS) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(len(lengths), max(lengths), width, generator=generator) for _ in range(count)]


def loss(student, teacher, pairs=PAIRS, mask=None, **kwargs) -> torch.Tensor:
    return temporal_relation_loss(student, teacher, pairs, mask_of() if mask is None else mask, 2, 4, **kwargs)


def reference(student, teacher, pairs, mask, student_layers, teacher_layers, intra_layer_weight=1.0):
    """The definition written plainly: per utterance, full T x T cosine Grams of its valid frames."""
    total = torch.zeros((), dtype=torch.float64)
    intra = intra_layer_pairs(pairs, student_layers, teacher_layers)
    for b in range(mask.shape[0]):
        def unit(states, i):
            return F.normalize(states[i][b][~mask[b]].double(), dim=-1)

        for s, t in pairs:
            gap = unit(student, s) @ unit(student, s).T - unit(teacher, t) @ unit(teacher, t).T
            total = total + gap.square().mean() / mask.shape[0]
        for s, t_in, t in intra:
            gap = unit(student, s - 1) @ unit(student, s).T - unit(teacher, t_in) @ unit(teacher, t).T
            total = total + intra_layer_weight * gap.square().mean() / mask.shape[0]
    return total


def orthogonal(width: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(seed)))[0]


# ------------------------------------------------------------------------------------ the loss
def test_zero_for_identical_states_and_positive_otherwise():
    states = random_states(5, 12, seed=0)
    assert loss(states, states, pairs=[[i, i] for i in range(5)]).item() == 0.0
    other = [s + 0.3 * torch.randn_like(s) for s in states]
    assert loss(other, states, pairs=[[i, i] for i in range(5)]).item() > 1e-3


@pytest.mark.parametrize("block_elements", [1 << 24, 50])  # one block; many blocks of a few frames
def test_equals_the_plain_definition_in_value_and_gradient(block_elements):
    student = [s.requires_grad_() for s in random_states(3, 8, seed=1)]  # narrower than the teacher
    teacher = random_states(5, 12, seed=2)
    ours = loss(student, teacher, block_elements=block_elements, intra_layer_weight=0.7)
    ours_grads = torch.autograd.grad(ours, student)
    plain_student = [s.detach().double().requires_grad_() for s in student]
    plain = reference(plain_student, teacher, PAIRS, mask_of(), 2, 4, intra_layer_weight=0.7)
    plain_grads = torch.autograd.grad(plain, plain_student)
    assert ours.item() == pytest.approx(plain.item(), rel=1e-5)
    for a, b in zip(ours_grads, plain_grads):
        assert torch.allclose(a.double(), b, atol=1e-7, rtol=1e-4)


def test_invariant_to_feature_rotation_and_frame_scale_not_to_time_order():
    """A TGM of unit frames depends on angles between frames: not on the feature basis or frame norms."""
    student, teacher = random_states(3, 8, seed=3), random_states(5, 12, seed=4)
    before = loss(student, teacher).item()
    q = orthogonal(8, seed=5)
    scale = torch.rand(3, 20, 1, generator=torch.Generator().manual_seed(6)) * 10 + 0.1
    assert loss([s @ q for s in student], teacher).item() == pytest.approx(before, rel=1e-5)
    assert loss([s * scale for s in student], teacher).item() == pytest.approx(before, rel=1e-5)
    copied = [teacher[0], teacher[2], teacher[4]]  # the teacher's own paired states: loss 0
    order = torch.randperm(20, generator=torch.Generator().manual_seed(7))
    assert loss(copied, teacher).item() == 0.0
    assert loss([s[:, order] for s in copied], teacher).item() > 1e-3


def test_intra_layer_term_sees_what_the_layer_wise_one_cannot():
    """Each state rotated by its own matrix: every layer-wise TGM is unchanged, the layers' in->out relation is not."""
    teacher = random_states(5, 8, seed=8)
    student = [teacher[0] @ orthogonal(8, 9), teacher[2] @ orthogonal(8, 10), teacher[4] @ orthogonal(8, 11)]
    assert loss(student, teacher, intra_layer_weight=0.0).item() == pytest.approx(0.0, abs=1e-10)
    assert loss(student, teacher).item() > 1e-3
    # Intra-layer terms only where both states are layer outputs (not the input state, not prediction
    # heads); the teacher's side spans the layers between the states paired with s-1 and s.
    assert intra_layer_pairs([[0, 0], [1, 4], [2, 8], [3, 12]], 2, 12) == [(1, 0, 4), (2, 4, 8)]
    assert intra_layer_pairs([[1, 2], [2, 4]], 2, 4) == [(1, 0, 2), (2, 2, 4)]  # layer_to_layer
    assert intra_layer_pairs([[4, 4], [8, 8], [12, 12]], 12, 12) == [(4, 3, 4), (8, 7, 8), (12, 11, 12)]


def test_padded_frames_do_not_enter_the_grams():
    student = [s.requires_grad_() for s in random_states(3, 8, seed=12)]
    teacher = random_states(5, 12, seed=13)
    mask = mask_of()
    clean = loss(student, teacher)
    clean_grads = torch.autograd.grad(clean, student)

    def garbage(states):
        return [torch.where(mask[..., None], torch.full_like(s, 1e6) * torch.randn_like(s), s) for s in states]

    dirty_student = [s.detach().requires_grad_() for s in garbage(student)]
    dirty = loss(dirty_student, garbage(teacher))
    dirty_grads = torch.autograd.grad(dirty, dirty_student)
    assert dirty.item() == pytest.approx(clean.item(), rel=1e-6)
    for a, b in zip(clean_grads, dirty_grads):
        assert torch.equal(b[mask], torch.zeros_like(b[mask]))  # no gradient into padding
        assert torch.allclose(a, b, atol=1e-9)

    # The batch's loss is the mean of each utterance's loss run alone, unpadded.
    alone = []
    for b, n in enumerate(LENGTHS):
        cut = lambda states: [s[b:b + 1, :n] for s in states]  # noqa: E731
        alone.append(temporal_relation_loss(cut(student), cut(teacher), PAIRS, mask_of((n,)), 2, 4).item())
    assert clean.item() == pytest.approx(sum(alone) / len(alone), rel=1e-5)


def test_backward_keeps_no_time_by_time_matrix():
    """The memory bound: no T x T tensor is saved for backward, whatever the utterance length."""
    frames = 400
    lengths = (frames, 300)
    student = [s.requires_grad_() for s in random_states(3, 8, seed=14, lengths=lengths)]
    teacher = random_states(5, 8, seed=15, lengths=lengths)
    saved: list[int] = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = temporal_relation_loss(student, teacher, PAIRS, mask_of(lengths), 2, 4, block_elements=20_000)
    value.backward()
    assert saved and max(saved) < frames * frames  # the states' (B, T, D) copies, never (B, T, T) Grams


def test_float32_under_autocast():
    """Under bf16 autocast the Grams are still float32: a TGM gap is small against entries near 1."""
    student, teacher = random_states(3, 8, seed=16), random_states(5, 12, seed=17)
    exact = loss(student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss(student, teacher)
    assert autocast.dtype == torch.float32 and autocast.item() == pytest.approx(exact.item(), rel=1e-6)


# ------------------------------------------------------------------------ through the command line
def student_loss(model: SpeechTransformer, teacher: SpeechTransformer, wavs, pairs) -> float:
    lengths = torch.tensor([len(w) for w in wavs])
    batch = pad_sequence(wavs, batch_first=True)
    with torch.no_grad():
        target, mask = teacher.eval()(batch, lengths)
        states, _ = model.eval()(batch, lengths)
        return temporal_relation_loss(states, target, pairs, mask, model.config.num_layers,
                                      teacher.config.num_layers).item()


def test_compress_trains_with_temporal_relation_and_the_loss_falls(tmp_path, audio_dir, monkeypatch):
    from upstream_compressed.audio import list_audio, load_audio
    from upstream_compressed.testing.checkpoints import make_hubert_checkpoint
    from upstream_compressed.train import distill

    calls = []

    def spy(*args, **kwargs):
        calls.append(args[2])  # the pairs
        return temporal_relation_loss(*args, **kwargs)

    monkeypatch.setattr(distill, "temporal_relation_loss", spy)

    ckpt = make_hubert_checkpoint(tmp_path / "teacher.pt", layers=4)
    training = {"audio": str(audio_dir), "batch_size": 2, "max_seconds": 1.0, "lr": 2e-3, "device": "cpu",
                "objective": "temporal_relation", "checkpoint_every": 100}
    recipe = {"base": str(ckpt), "steps": [
        {"method": "distillation", "student_layers": 2, "variant": "layer_to_layer", "steps": 12, **training},
        {"method": "head_pruning", "ratio": 0.5, "criterion": "random", "seed": 1,
         "recovery": {**training, "steps": 12, "intra_layer_weight": 0.5, "pairs": [[0, 0], [1, 2], [2, 4]]}},
    ]}
    path, out = tmp_path / "recipe.yaml", tmp_path / "kd_head.safetensors"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["compress", str(path), "-o", str(out), "--keep-work"]) == 0
    assert calls == [[[1, 2], [2, 4]]] * 12 + [[[0, 0], [1, 2], [2, 4]]] * 12  # every step, its own pairs

    histories = [torch.load(tmp_path / "kd_head.safetensors.work" / f"step-{i}-training.pt",
                            weights_only=True)["history"] for i in (0, 1)]
    for history in histories:
        assert len(history) == 12 and all(h > 0 for h in history)
        assert sum(history[-3:]) < sum(history[:3])  # batches differ step to step: compare ends, not points

    # On fixed audio: the distilled, pruned, recovered student relates its frames more like the
    # teacher does than the same structure untrained (the teacher's first two layers, same heads removed).
    base = load_base(ckpt)
    teacher = SpeechTransformer.from_state_dict(base.config, base.state_dict)
    trained = apply_delta(read_delta(out), base)
    config = copy.deepcopy(base.config)
    config.layers = config.layers[:2]
    untrained = SpeechTransformer(config)
    untrained.load_state_dict({k: v for k, v in base.state_dict.items() if k in untrained.state_dict()})
    prune = {k: v for k, v in recipe["steps"][1].items() if k != "recovery"}
    untrained, _ = STEPS["head_pruning"](untrained, Structure.identity(config), prune,
                                         StepContext(base, tmp_path, 1, {}))
    assert untrained.config.to_dict() == trained.config.to_dict()
    wavs = [load_audio(f, 1.0) for f in list_audio(audio_dir)]
    pairs = [[0, 0], [1, 2], [2, 4]]
    assert student_loss(trained, teacher, wavs, pairs) < 0.8 * student_loss(untrained, teacher, wavs, pairs)


# ------------------------------------------------------------------------------------ validation
def recovery_with(**options):
    return {"base": "t.pt", "steps": [{"method": "row_pruning", "ratio": 0.5,
                                       "recovery": {"audio": "a", **options}}]}


@pytest.mark.parametrize(
    "recipe,message",
    [
        (recovery_with(objective="temporal_relation", cosine_weight=0.5),
         r"steps\[0\]\.recovery\.cosine_weight: applies to objective hidden_states only"),
        (recovery_with(intra_layer_weight=0.5),
         r"steps\[0\]\.recovery\.intra_layer_weight: applies to objective temporal_relation only"),
        (recovery_with(objective="temporal_relation", intra_layer_weight=-1),
         r"steps\[0\]\.recovery\.intra_layer_weight: expected a non-negative number"),
        (recovery_with(objective="temporal_relation", intra_layer_weight="high"),
         r"steps\[0\]\.recovery\.intra_layer_weight: expected a non-negative number"),
        (recovery_with(objective="cluster_kl", pairs=[[1, 1]]),
         r"steps\[0\]\.recovery\.pairs: applies to objective hidden_states and temporal_relation only"),
        (recovery_with(objective="temporal_relations"), r"steps\[0\]\.recovery\.objective: 'temporal_relations' is not"),
        ({"base": "t.pt", "steps": [{"method": "distillation", "audio": "a", "objective": "temporal_relation",
                                     "cosine_weight": 1.0}]}, r"steps\[0\]\.cosine_weight: applies to objective"),
    ],
)
def test_bad_options_are_refused_naming_the_field(recipe, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe)


def test_good_options_are_accepted():
    parse_recipe(recovery_with(objective="temporal_relation", pairs=[[1, 1]], intra_layer_weight=0))
