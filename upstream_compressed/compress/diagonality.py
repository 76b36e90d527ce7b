"""How diagonal each attention head is: the share of its attention mass near the diagonal.

The model's attention runs through ``scaled_dot_product_attention``, which never materialises the
probabilities. The analysis recomputes them, only while it runs, from each layer's own q/k
projections: softmax(Q K^T / sqrt(d) + mask) with padded keys masked (and WavLM's relative position
bias in the mask, gated as the model gates it), the same numbers SDPA uses. A
forward pre-hook on every attention block sees its input, so the model's code and its normal
forward pass are untouched.

Diagonality of a head on one utterance: the mean over its valid query frames i of the attention
mass on key frames j with |i - j| <= band. Averaged over utterances, it lies in [0, 1]: 1 for a
head that looks only at its neighbourhood, about (2 band + 1) / T for a uniform head.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from ..audio import load_audio, sample_audio
from ..model import SpeechTransformer
from ..model.layers import SelfAttention

DEFAULT_BAND = 2  # frames either side of the diagonal (40 ms at 20 ms frames)


def attention_probabilities(attention: SelfAttention, x: Tensor, padding_mask: Tensor | None,
                            position_bias: Tensor | None = None) -> Tensor:
    """(B, H, T, T) attention probabilities of ``attention`` on its input ``x`` (B, T, D), with WavLM's
    relative position bias (gated where the model gates it) when ``position_bias`` is given."""
    batch, time, _ = x.shape
    heads, dim = attention.num_heads, attention.head_dim

    def split(t: Tensor) -> Tensor:
        return t.view(batch, time, heads, dim).transpose(1, 2)

    scores = split(attention.q_proj(x)) @ split(attention.k_proj(x)).transpose(-1, -2) / math.sqrt(dim)
    if position_bias is not None:
        return (scores + attention.biased_mask(x, padding_mask, position_bias)).softmax(dim=-1)
    if padding_mask is not None:
        scores = scores.masked_fill(padding_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1)


def band_mass(probabilities: Tensor, padding_mask: Tensor | None, band: int) -> Tensor:
    """(B, H): per utterance and head, the mean over valid query frames of the mass within ±``band``."""
    batch, _, time, _ = probabilities.shape
    positions = torch.arange(time, device=probabilities.device)
    near = ((positions[:, None] - positions[None, :]).abs() <= band).to(probabilities.dtype)
    per_query = (probabilities * near).sum(-1)  # (B, H, T)
    valid = torch.ones(batch, time, device=probabilities.device) if padding_mask is None else (~padding_mask).float()
    return (per_query * valid[:, None, :]).sum(-1) / valid.sum(-1, keepdim=True).clamp_min(1)


def diagonality_scores(
    model: SpeechTransformer,
    audio_dir: str,
    band: int = DEFAULT_BAND,
    max_utterances: int = 32,
    max_seconds: float = 8.0,
    batch_size: int = 4,
    seed: int = 0,
    **_: Any,
) -> list[Tensor]:
    """Per layer, each head's diagonality averaged over the utterances of ``audio_dir``."""
    files = sample_audio(audio_dir, max_utterances, seed)
    device = next(model.parameters()).device
    totals = [torch.zeros(layer.num_heads, dtype=torch.float64) for layer in model.config.layers]

    def hook(index: int):
        def record(module: SelfAttention, inputs: tuple[Any, ...]) -> None:
            if module.num_heads:
                x, padding_mask, position_bias = (*inputs, None, None)[:3]
                probabilities = attention_probabilities(module, x, padding_mask, position_bias)
                mass = band_mass(probabilities, padding_mask, band)
                totals[index] += mass.sum(0).double().cpu()
        return record

    handles = [layer.attention.register_forward_pre_hook(hook(i)) for i, layer in enumerate(model.layers)
               if layer.attention is not None]  # a removed sublayer has no heads to measure
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(files), batch_size):
                wavs = [load_audio(f, max_seconds) for f in files[start:start + batch_size]]
                lengths = torch.tensor([len(w) for w in wavs], device=device)
                model(pad_sequence(wavs, batch_first=True).to(device), lengths)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [(total / len(files)).float() for total in totals]
