"""Logit distillation (``objective: cluster_kl``): KL on HuBERT's cluster posteriors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from upstream_compressed.compress import run_recipe
from upstream_compressed.delta import write_delta
from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import load_base
from upstream_compressed.recipe import RecipeError, parse_recipe
from upstream_compressed.testing.checkpoints import make_hubert_checkpoint
from upstream_compressed.train.cluster_head import NoClusterHeadError, cluster_head_of, cluster_kl_loss
from upstream_compressed.train.distill import TrainOptions, train_distillation

from helpers import run_model


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    return make_hubert_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.pt", layers=4)


@pytest.fixture(scope="module")
def teacher(teacher_ckpt):
    base = load_base(teacher_ckpt)
    return base, SpeechTransformer.from_state_dict(base.config, base.state_dict).eval()


def truncated_student(base, layers: int) -> SpeechTransformer:
    config = copy.deepcopy(base.config)
    config.layers = config.layers[:layers]
    model = SpeechTransformer(config)
    model.load_state_dict({k: v for k, v in base.state_dict.items() if k in model.state_dict()})
    return model


def posterior_loss(student, student_head, teacher, teacher_head, wavs) -> torch.Tensor:
    """cluster_kl_loss of a student (and its head) against the teacher on a padded batch."""
    states, mask = run_model(teacher, wavs)
    lengths = torch.tensor([len(w) for w in wavs])
    student_states, student_mask = student(pad_sequence(wavs, batch_first=True), lengths)
    assert torch.equal(mask, student_mask)
    return cluster_kl_loss(student_head(student_states[student.config.num_layers]),
                           teacher_head(states[teacher.config.num_layers]), mask)


def test_cluster_head_gives_s3prl_hubert_posteriors(s3prl_hub, teacher_ckpt, teacher, padded_batch):
    """Our head's log-posterior of a target equals the one in S3PRL's HubertModel's own pre-training logits."""
    base, model = teacher
    head = cluster_head_of(base)
    assert head.temperature == 0.1 and head.num_clusters == 10
    states, mask = run_model(model, padded_batch)
    with torch.no_grad():
        ours = torch.log_softmax(head(states[-1]), dim=-1)[~mask]

    hubert = s3prl_hub.hubert_local(ckpt=str(teacher_ckpt)).model.eval()
    # S3PRL's forward computes logits only on its masking path: mask nothing, so every valid frame is "unmasked".
    hubert.apply_mask = lambda x, padding_mask, target_list: (x, torch.zeros(x.shape[:2], dtype=torch.bool))
    hubert.skip_masked = True
    lengths = torch.tensor([len(w) for w in padded_batch])
    wavs = pad_sequence(padded_batch, batch_first=True)
    targets = torch.randint(0, 10, (len(padded_batch), mask.shape[1]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = hubert(wavs, target_list=[targets], padding_mask=torch.arange(wavs.shape[1])[None] >= lengths[:, None],
                     mask=True)
    # S3PRL's logits per valid frame: [positive, every cluster with the positive set to -inf] / logit_temp
    theirs = torch.log_softmax(out["logit_u_list"][0].float(), dim=-1)[:, 0]
    assert torch.equal(out["padding_mask"], mask)
    assert torch.allclose(ours.gather(1, targets[~mask][:, None]).squeeze(1), theirs, atol=1e-4)


def test_loss_is_zero_for_the_teacher_itself_and_gradients_flow(teacher, padded_batch):
    base, model = teacher
    head = cluster_head_of(base)
    same = posterior_loss(copy.deepcopy(model), copy.deepcopy(head), model, head, padded_batch)
    assert abs(same.item()) < 1e-6

    student, student_head = truncated_student(base, 2).train(), copy.deepcopy(head)
    loss = posterior_loss(student, student_head, model, head, padded_batch)
    assert loss.item() > 1e-3
    loss.backward()
    for name, module in (("layer 0 fc1", student.layers[0].feed_forward.fc1), ("front end", student.feature_extractor),
                         ("final_proj", student_head.final_proj)):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    assert student_head.label_embs.grad.abs().sum() > 0


def test_a_short_run_lowers_the_loss(tmp_path, teacher, audio_dir, padded_batch):
    base, model = teacher
    head = cluster_head_of(base)
    student = truncated_student(base, 2)
    with torch.no_grad():
        before = posterior_loss(student.eval(), head, model, head, padded_batch).item()
    options = TrainOptions(audio=str(audio_dir), steps=12, batch_size=2, max_seconds=1.0, lr=2e-3, device="cpu",
                           objective="cluster_kl", checkpoint_every=6)
    result = train_distillation(student, model, options, tmp_path / "kl.pt", teacher_head=head)
    trained_head = copy.deepcopy(head)
    trained_head.load_state_dict(torch.load(tmp_path / "kl.pt", weights_only=True)["cluster_head"])
    with torch.no_grad():
        after = posterior_loss(student.eval(), trained_head, model, head, padded_batch).item()
    assert len(result.history) == 12
    assert after < 0.7 * before, (before, after)
    assert not any(p.requires_grad for p in head.parameters()), "the teacher's head stays frozen"


def kl_step(audio_dir, **extra):
    return {"method": "distillation", "student_layers": 2, "objective": "cluster_kl", "audio": str(audio_dir),
            "steps": 3, "batch_size": 2, "max_seconds": 1.0, "lr": 1e-3, "device": "cpu", **extra}


def test_logit_distilled_student_is_a_plain_upstream(tmp_path, teacher_ckpt, audio_dir, s3prl_hub, padded_batch):
    """The student keeps no cluster head: not in its hidden states, not in the delta."""
    delta = run_recipe(parse_recipe({"base": str(teacher_ckpt), "steps": [kl_step(audio_dir)]}))
    assert delta.technique == "kd"
    assert delta.manifest["config"]["pred_layer_id"] == [] and len(delta.manifest["config"]["layers"]) == 2
    assert not any("final_proj" in n or "label_embs" in n or n.startswith("prediction_heads") for n in delta.tensors)
    path = write_delta(delta, tmp_path / "kd_logits.safetensors")
    with torch.no_grad():
        states = s3prl_hub.hubert_kd(ckpt=str(path))(padded_batch)["hidden_states"]
    assert len(states) == 3  # input of layers 1 and 2, encoder output
    assert all(s.shape[-1] == 64 for s in states)


def test_recovery_by_cluster_kl(teacher_ckpt, audio_dir):
    recovery = {"audio": str(audio_dir), "steps": 2, "batch_size": 2, "max_seconds": 1.0, "device": "cpu",
                "objective": "cluster_kl", "logit_temperature": 0.2}
    delta = run_recipe(parse_recipe({"base": str(teacher_ckpt),
                                     "steps": [{"method": "head_pruning", "ratio": 0.5, "recovery": recovery}]}))
    assert any(name.startswith("layers.") for name in delta.tensors), "recovery changed the kept weights"


def test_a_teacher_without_cluster_head_is_refused_before_work(distiller_ckpt, audio_dir):
    with pytest.raises(NoClusterHeadError, match="cluster prediction head"):
        cluster_head_of(load_base(distiller_ckpt))
    with pytest.raises(RecipeError, match=r"steps\[0\]\.objective: .*cluster prediction head.*s3prl_distiller"):
        run_recipe(parse_recipe({"base": str(distiller_ckpt), "steps": [kl_step(audio_dir)]}))


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"objective": "logits"}, r"steps\[0\]\.objective: 'logits' is not one of"),
        ({"variant": "layer_to_layer"}, r"steps\[0\]\.variant: objective cluster_kl trains .* remove `variant`"),
        ({"pred_layers": [2, 4]}, r"steps\[0\]\.pred_layers: objective cluster_kl"),
        ({"cosine_weight": 0.5}, r"steps\[0\]\.cosine_weight: applies to objective hidden_states only"),
        ({"logit_temperature": 0}, r"steps\[0\]\.logit_temperature: expected a positive number"),
        ({"objective": "hidden_states", "logit_temperature": 0.1}, r"logit_temperature: applies to objective cluster_kl"),
    ],
)
def test_bad_logit_distillation_steps_are_refused(audio_dir, extra, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"base": "t.pt", "steps": [kl_step(audio_dir, **extra)]})
