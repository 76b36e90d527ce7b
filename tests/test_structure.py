"""Structural operations return smaller modules that compute what the masked original computes."""

from __future__ import annotations

import torch

from upstream_compressed.model import SpeechTransformer
from upstream_compressed.model.convert import load_base

from helpers import max_valid_difference, run_model


def base_model(ckpt) -> SpeechTransformer:
    converted = load_base(ckpt)
    model = SpeechTransformer(converted.config)
    model.load_state_dict(converted.state_dict)
    return model.eval()


def test_keeping_all_heads_in_another_order_changes_nothing(hubert_ckpt, padded_batch):
    model = base_model(hubert_ckpt)
    expected, mask = run_model(model, padded_batch)
    model.keep_heads(0, [3, 1, 0, 2])
    model.keep_units(1, list(reversed(range(model.config.layers[1].ffn_dim))))
    states, _ = run_model(model, padded_batch)
    for a, b in zip(states, expected):
        assert max_valid_difference(a, b, mask) < 1e-5


def test_removing_heads_equals_zeroing_their_output_columns(hubert_ckpt, padded_batch):
    masked = base_model(hubert_ckpt)
    head_dim = masked.config.head_dim
    with torch.no_grad():  # heads 1 and 3 of layer 1 contribute nothing once their out_proj columns are 0
        for head in (1, 3):
            masked.layers[1].attention.out_proj.weight[:, head * head_dim:(head + 1) * head_dim] = 0
    expected, mask = run_model(masked, padded_batch)

    pruned = base_model(hubert_ckpt)
    pruned.keep_heads(1, [0, 2])
    states, _ = run_model(pruned, padded_batch)
    assert pruned.config.layers[1].num_heads == 2
    assert pruned.layers[1].attention.q_proj.weight.shape == (2 * head_dim, pruned.config.embed_dim)
    for a, b in zip(states, expected):
        assert max_valid_difference(a, b, mask) < 1e-5
    # The config describes the pruned model: building from it gives the same shapes.
    rebuilt = SpeechTransformer(pruned.config)
    rebuilt.load_state_dict(pruned.state_dict())


def test_removing_units_equals_zeroing_their_fc2_columns(distiller_ckpt, padded_batch):
    masked = base_model(distiller_ckpt)
    keep = list(range(0, masked.config.layers[0].ffn_dim, 3))
    drop = sorted(set(range(masked.config.layers[0].ffn_dim)) - set(keep))
    with torch.no_grad():
        masked.layers[0].feed_forward.fc2.weight[:, drop] = 0
    expected, mask = run_model(masked, padded_batch)

    pruned = base_model(distiller_ckpt)
    pruned.keep_units(0, keep)
    states, _ = run_model(pruned, padded_batch)
    assert pruned.layers[0].feed_forward.fc1.weight.shape[0] == len(keep)
    for a, b in zip(states, expected):
        assert max_valid_difference(a, b, mask) < 1e-5


def test_a_layer_without_heads_or_units_is_a_residual_plus_biases(hubert_ckpt, padded_batch):
    model = base_model(hubert_ckpt)
    model.keep_heads(0, [])
    model.keep_units(0, [])
    layer = model.layers[0]
    x = torch.randn(2, 7, model.config.embed_dim)
    with torch.no_grad():
        after_attention = layer.attention_norm(x + layer.attention.out_proj.bias)
        expected = layer.final_norm(after_attention + layer.feed_forward.fc2.bias)
        assert torch.allclose(layer(x), expected, atol=1e-6)
    states, _ = run_model(model, padded_batch)  # and the whole model still runs
    assert all(torch.isfinite(s).all() for s in states)
