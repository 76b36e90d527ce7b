"""Our SpeechTransformer equals S3PRL's own upstreams on the same checkpoint (valid frames, padded batch)."""

from __future__ import annotations

import pytest
import torch

from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import Converted, load_base, to_s3prl_checkpoint
from upstream_compressed.testing.checkpoints import make_distiller_checkpoint, make_hubert_checkpoint

from helpers import max_valid_difference, run_model

TOLERANCE = 1e-5

VARIANTS = [
    ("hubert_local", make_hubert_checkpoint, {}),
    (
        "hubert_local",
        make_hubert_checkpoint,
        {"layer_norm_first": True, "normalize": True, "extractor_mode": "layer_norm", "layers": 3},
    ),
    ("hubert_local", make_hubert_checkpoint, {"dim": 48, "heads": 3, "conv_pos": 15}),  # projection + odd kernel
    ("distiller_local", make_distiller_checkpoint, {}),
    ("distiller_local", make_distiller_checkpoint, {"layer_norm_first": True, "pred_layer_id": (3,)}),
]


def s3prl_states(hub, entry: str, ckpt, wavs) -> list[torch.Tensor]:
    upstream = getattr(hub, entry)(ckpt=str(ckpt)).eval()
    with torch.no_grad():
        return list(upstream([w.clone() for w in wavs])["hidden_states"])


@pytest.mark.parametrize("entry,maker,options", VARIANTS, ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_hidden_states_match_s3prl(tmp_path, s3prl_hub, padded_batch, entry, maker, options):
    ckpt = maker(tmp_path / "base.pt", **options)
    expected = s3prl_states(s3prl_hub, entry, ckpt, padded_batch)

    converted = load_base(ckpt)
    model = SpeechTransformer(converted.config)
    model.load_state_dict(converted.state_dict)
    states, padding_mask = run_model(model, padded_batch)

    assert len(states) == len(expected) == converted.config.num_hidden_states
    assert padding_mask.any(), "the batch must contain padding for this test to mean anything"
    for layer, (ours, theirs) in enumerate(zip(states, expected)):
        assert max_valid_difference(ours, theirs, padding_mask) < TOLERANCE, f"hidden state {layer}"


@pytest.mark.parametrize("entry,maker", [("hubert_local", make_hubert_checkpoint), ("distiller_local", make_distiller_checkpoint)])
def test_round_trip_back_to_s3prl_format(tmp_path, s3prl_hub, padded_batch, entry, maker):
    ckpt = maker(tmp_path / "base.pt")
    converted = load_base(ckpt)
    written = tmp_path / "written.pt"
    torch.save(to_s3prl_checkpoint(converted), written)

    again = load_base(written)
    assert again.config == converted.config
    assert again.state_dict.keys() == converted.state_dict.keys()
    assert all(torch.equal(again.state_dict[k], v) for k, v in converted.state_dict.items())
    # S3PRL's own loader reads what we wrote, and computes the same thing.
    before = s3prl_states(s3prl_hub, entry, ckpt, padded_batch)
    after = s3prl_states(s3prl_hub, entry, written, padded_batch)
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-6)


def test_weight_pruned_model_writes_back_without_its_masks(tmp_path, s3prl_hub, padded_batch):
    """S3PRL's checkpoint has no masks: the zeroed weights alone carry the pruning, and compute the same."""
    converted = load_base(make_hubert_checkpoint(tmp_path / "base.pt"))
    model = SpeechTransformer(converted.config)
    model.load_state_dict(converted.state_dict)
    linear = model.linear(0, "fc1")
    keep = torch.rand(linear.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.7
    model.prune_weights(0, "fc1", keep)
    state = model.state_dict()
    assert any(key.endswith(".mask") for key in state)
    written = tmp_path / "pruned.pt"
    torch.save(to_s3prl_checkpoint(Converted(converted.config, state, converted.source_format, converted.extras)),
               written)

    theirs = s3prl_states(s3prl_hub, "hubert_local", written, padded_batch)
    ours, padding_mask = run_model(model.eval(), padded_batch)
    assert int((load_base(written).state_dict["layers.0.feed_forward.fc1.weight"] != 0).sum()) == int(keep.sum())
    for layer, (a, b) in enumerate(zip(ours, theirs)):
        assert max_valid_difference(a, b, padding_mask) < TOLERANCE, f"hidden state {layer}"


@pytest.mark.parametrize("entry,maker", [("hubert_local", make_hubert_checkpoint), ("distiller_local", make_distiller_checkpoint)])
def test_head_pruned_model_writes_back_with_zero_heads(tmp_path, s3prl_hub, padded_batch, entry, maker):
    """S3PRL's attention is always embed_dim wide: pruned heads go back as all-zero heads, which add nothing."""
    converted = load_base(maker(tmp_path / "base.pt"))
    model = SpeechTransformer.from_state_dict(converted.config, converted.state_dict)
    heads = converted.config.layers[0].num_heads
    for layer in range(converted.config.num_layers):  # a different count and choice per layer
        model.keep_heads(layer, list(range(heads))[layer % 2::2])
    written = tmp_path / "pruned.pt"
    torch.save(to_s3prl_checkpoint(Converted(model.config, model.state_dict(), converted.source_format,
                                             converted.extras)), written)

    theirs = s3prl_states(s3prl_hub, entry, written, padded_batch)
    ours, padding_mask = run_model(model.eval(), padded_batch)
    for layer, (a, b) in enumerate(zip(ours, theirs)):
        assert max_valid_difference(a, b, padding_mask) < TOLERANCE, f"hidden state {layer}"


def test_padding_changes_group_norm_features_as_in_s3prl(hubert_ckpt, padded_batch):
    """The GroupNorm front end sees padding: an utterance alone differs from the same one in a batch."""
    converted = load_base(hubert_ckpt)
    model = SpeechTransformer(converted.config)
    model.load_state_dict(converted.state_dict)
    batched, mask = run_model(model, padded_batch)
    alone, _ = run_model(model, [padded_batch[1]])
    frames = int((~mask[1]).sum())
    assert (batched[-1][1, :frames] - alone[-1][0, :frames]).abs().max() > 1e-3
