"""Analytic sizes of a :class:`ModelConfig`: parameters and MACs, without building the model.

Exact for integer structures (they equal ``SpeechTransformer.num_parameters`` and
``profile.count_macs``), and differentiable when the structural counts are soft: expected numbers
of kept channels, heads, units and sublayers under pruning gates, given as floats or 0-d tensors.
The counts multiply like the shapes they stand for (conv i's weight is C_{i-1} x C_i x k, an
attention map costs heads x head_dim x T^2), so a size target can be trained towards.
WavLM's relative position bias is a lookup (parameters, no MACs); its gate is a Linear per kept head.

What is counted matches ``count_macs``, which uses ``FlopCounterMode``: convolutions, matrix
products and attention's two T x T products; biases, norms, activations and softmax are free.
Masked (weight-pruned) Linears count as dense, like ``count_macs``.

One discontinuity is the model's own: a block left with no heads (units) runs none of its Linears,
so an integer 0 drops the MACs of its low-rank down-projections, which soft counts keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from torch import Tensor

from .config import FBANK, FBANK_SHIFT, FBANK_WINDOW, LayerConfig, ModelConfig
from .layers import GATE_OUTPUTS

SAMPLE_RATE = 16000
Number = Union[int, float, Tensor]


@dataclass
class Counts:
    """The prunable sizes of a model; each list holds ints, floats or 0-d tensors (expected counts)."""

    channels: list  # per conv layer: output channels kept
    heads: list  # per encoder layer: attention heads
    units: list  # per encoder layer: FFN hidden units
    attention: list  # per encoder layer: 1 if the attention sublayer exists (or its probability)
    ffn: list  # per encoder layer: 1 if the FFN sublayer exists (or its probability)


def counts_of(config: ModelConfig) -> Counts:
    """The integer counts ``config`` describes."""
    return Counts(
        channels=[channels for channels, _, _ in config.conv_layers],
        heads=[layer.num_heads for layer in config.layers],
        units=[layer.ffn_dim for layer in config.layers],
        attention=[int(layer.attention) for layer in config.layers],
        ffn=[int(layer.ffn) for layer in config.layers],
    )


def _check(config: ModelConfig, counts: Counts | None) -> Counts:
    if counts is None:
        return counts_of(config)
    expected = {"channels": len(config.conv_layers), "heads": config.num_layers, "units": config.num_layers,
                "attention": config.num_layers, "ffn": config.num_layers}
    for name, size in expected.items():
        if len(getattr(counts, name)) != size:
            raise ValueError(f"counts.{name} has {len(getattr(counts, name))} entries; the config needs {size}")
    return counts


def _result(total: Number) -> Number:
    """An int when every count was an int (exact), else the float or tensor (differentiable)."""
    return total if isinstance(total, Tensor) else (int(total) if float(total).is_integer() else total)


def _linear_parameters(config: LayerConfig, name: str, n_in: Number, n_out: Number) -> Number:
    rank = config.ranks.get(name)
    if rank is not None:  # down (in x r, no bias) then up (r x out + bias)
        return n_in * rank + rank * n_out + n_out
    return n_in * n_out + n_out  # a masked Linear stores its weight densely (the mask is a buffer)


def _linear_macs(config: LayerConfig, name: str, n_in: Number, n_out: Number) -> Number:
    """Per frame."""
    rank = config.ranks.get(name)
    return n_in * n_out if rank is None else n_in * rank + rank * n_out


def _layer_terms(config: ModelConfig, layer: LayerConfig, heads: Number, units: Number,
                 per_linear: Any) -> tuple[Number, Number]:
    """(attention, FFN) sums of ``per_linear`` over the sublayers' Linears, before sublayer gates."""
    d, inner = config.embed_dim, heads * config.head_dim
    attention = sum(per_linear(layer, name, d, inner) for name in ("q_proj", "k_proj", "v_proj")) \
        + per_linear(layer, "out_proj", inner, d)
    ffn = per_linear(layer, "fc1", d, units) + per_linear(layer, "fc2", units, d)
    return attention, ffn


def parameter_count(config: ModelConfig, counts: Counts | None = None) -> Number:
    """Parameters of the model ``config`` describes, with its prunable sizes replaced by ``counts``."""
    counts = _check(config, counts)
    c, d = config, config.embed_dim
    total: Number = 0
    conv_dim: Number = c.conv_dim
    if c.frontend != FBANK:  # the fbank front end has only buffers (its statistics)
        previous: Number = 1
        for i, (channels, (_, kernel, _)) in enumerate(zip(counts.channels, c.conv_layers)):
            total = total + previous * channels * kernel + (channels if c.conv_bias else 0)
            if c.extractor_mode == "layer_norm" or i == 0:  # LayerNorm on every conv, or GroupNorm on the first
                total = total + 2 * channels
            previous = channels
        conv_dim = previous
    if c.feature_layer_norm:
        total = total + 2 * conv_dim
    if c.has_feature_projection:
        total = total + conv_dim * d + d
    total = total + c.conv_pos + d * (d // c.conv_pos_groups) * c.conv_pos + d  # weight_g, weight_v, bias
    total = total + 2 * d  # encoder_norm
    # WavLM's relative position bias keeps a column per original head, whatever the layers keep.
    total = total + c.relative_position_buckets * c.relative_position_heads
    for layer, heads, units, attention, ffn in zip(c.layers, counts.heads, counts.units, counts.attention, counts.ffn):
        attention_params, ffn_params = _layer_terms(c, layer, heads, units, _linear_parameters)
        if c.gated_relative_position:  # the gate Linear (shared by the heads) and one scale per head
            attention_params = attention_params + c.head_dim * GATE_OUTPUTS + GATE_OUTPUTS + heads
        total = total + attention * attention_params + ffn * ffn_params + 4 * d  # both LayerNorms always stay
    if c.pred_layer_id:
        n, inter, out = len(c.pred_layer_id), c.pred_inter_dim, c.pred_out_dim
        total = total + d * inter * n + inter * n + n * inter * out + n * out
    return _result(total)


def frame_count(config: ModelConfig, seconds: float) -> int:
    """Frames the encoder sees for ``seconds`` of audio (``count_macs``' input length)."""
    samples = int(seconds * SAMPLE_RATE)
    if config.frontend == FBANK:
        frames = (samples - FBANK_WINDOW) // FBANK_SHIFT + 1 if samples >= FBANK_WINDOW else 0
        return -(-frames // config.fbank_stack)
    for _, kernel, stride in config.conv_layers:
        samples = (samples - kernel) // stride + 1
    return samples


def mac_count(config: ModelConfig, seconds: float = 10.0, counts: Counts | None = None) -> Number:
    """Multiply-accumulates of one forward pass on ``seconds`` of audio, as ``count_macs`` counts them."""
    counts = _check(config, counts)
    c, d = config, config.embed_dim
    total: Number = 0
    conv_dim: Number = c.conv_dim
    if c.frontend == FBANK:
        total = total + _fbank_macs(config, seconds)
    else:
        length, previous = int(seconds * SAMPLE_RATE), 1
        for channels, (_, kernel, stride) in zip(counts.channels, c.conv_layers):
            length = (length - kernel) // stride + 1
            total = total + length * channels * previous * kernel
            previous = channels
        conv_dim = previous
    frames = frame_count(config, seconds)
    if c.has_feature_projection:
        total = total + frames * conv_dim * d
    # Positional conv: padding k//2 on both sides, so an even kernel yields one extra frame (then dropped).
    pos_frames = frames + 2 * (c.conv_pos // 2) - c.conv_pos + 1
    total = total + pos_frames * d * (d // c.conv_pos_groups) * c.conv_pos
    for layer, heads, units, attention, ffn in zip(c.layers, counts.heads, counts.units, counts.attention, counts.ffn):
        attention_macs, ffn_macs = _layer_terms(c, layer, heads, units, _linear_macs)
        attention_macs = attention_macs * frames + 2 * heads * c.head_dim * frames * frames  # Q K^T and A V
        if c.gated_relative_position:  # each kept head's input chunk through the gate Linear, every frame
            attention_macs = attention_macs + heads * c.head_dim * GATE_OUTPUTS * frames
        # A block with no heads (units) adds only its output bias and runs none of its Linears,
        # which matters for low-rank ones: their down-projection is still there.
        if isinstance(heads, int) and heads == 0:
            attention_macs = 0
        if isinstance(units, int) and units == 0:
            ffn_macs = 0
        total = total + attention * attention_macs + ffn * ffn_macs * frames
    if c.pred_layer_id:
        n, inter, out = len(c.pred_layer_id), c.pred_inter_dim, c.pred_out_dim
        total = total + frames * d * inter * n + frames * n * inter * out
    return _result(total)


def _fbank_macs(config: ModelConfig, seconds: float) -> int:
    """What ``count_macs`` counts inside torchaudio's Kaldi fbank: the mel filterbank's matrix product."""
    samples = int(seconds * SAMPLE_RATE)
    frames = (samples - FBANK_WINDOW) // FBANK_SHIFT + 1 if samples >= FBANK_WINDOW else 0
    padded_window = 1 << (FBANK_WINDOW - 1).bit_length()  # Kaldi rounds the FFT to a power of two
    return frames * (padded_window // 2 + 1) * config.fbank_mel_bins
