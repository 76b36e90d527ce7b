"""Speech temporal relation distillation (``objective: temporal_relation``), after STaRHuBERT.

Source: Jang, Kim and Kim, "STaR: Distilling Speech Temporal Relation for Lightweight Speech
Self-Supervised Learning Models", ICASSP 2024 (arXiv 2312.09040); its authors publish no code.
STaR matches temporal Gram matrices (TGMs, T x T: how every frame relates to every other frame)
instead of the frames themselves, so a student needs no projection heads and may be narrower than
its teacher. The paper explores three STaR objectives and keeps the best combination (its
abstract); that combination is a layer-wise and an intra-layer TGM (the paper's summary on
sciencestack.ai; that the third is an average-attention-map loss is from memory of the paper,
unverified here). This module implements those two terms:

- layer-wise, per (student state s, teacher state t) pair: ``G(X) = X̂ X̂ᵀ`` of that state;
- intra-layer, for pairs where both states are Transformer layer outputs (1 <= s <= student
  layers, 1 <= t <= teacher layers): ``G = X̂_in X̂_outᵀ``, the relation between the frames entering
  and leaving a layer (an FSP-style matrix over time). In this model's layouts state k-1 and state
  k bracket layer k, for HuBERT (which reports layer inputs, then the encoder output) and for the
  distiller/MelHuBERT (features, then layer outputs). The student's ``X_in`` is state s-1; the
  teacher's is the state paired with s-1 (see :func:`intra_layer_pairs`), so that a student layer
  standing for k teacher layers meets the relation across those k layers. STaR's students are as
  deep as the teacher (one to one), where this is simply layer t's input and output.

Implemented variant (what could not be checked against the paper's text is marked): ``X̂`` is the
state with each frame L2-normalised, so every TGM entry is a cosine similarity in [-1, 1]: Grams
of a 480-wide student and a 768-wide teacher, and of layers with very different norms, compare on
one scale; the loss is the mean squared difference over the T x T entries of each utterance,
averaged over utterances, summed over pairs (intra-layer terms weighted by ``intra_layer_weight``).
The paper's equations could not be read here (only its abstract and introduction were reachable):
its exact normalisation of a TGM (per-frame L2 as here, or another scaling) and its distance (MSE
as here, or another norm) and term weights are not verified.

Only valid frames enter a TGM: padded frames are set to zero before normalisation, so their rows
and columns are zero in both Grams and add nothing; each utterance is averaged over its own
T_valid² entries. Memory: a TGM is T x T per utterance (1000 frames at 20 s: 4 MB each, and 24
utterances x 13 pairs x 2 terms of them per step). The Grams are never kept for backward: a custom
autograd function computes the squared difference in blocks of frames and recomputes each block
in the backward pass, so what a step holds beyond the states is a float32 unit-frame copy of each
state used, (B, T, D), and one block of (B, rows, T) at a time (``block_elements``): memory linear
in T, not quadratic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# About 64 MB of float32 per block of Gram rows, whatever the batch and the utterance length.
BLOCK_ELEMENTS = 1 << 24


def _block_rows(batch: int, frames: int, block_elements: int) -> int:
    return max(1, block_elements // max(1, batch * frames))


class _GramGap(torch.autograd.Function):
    """``sum_b w_b ||a_b b_bᵀ - c_b e_bᵀ||_F²`` for (B, T, D) inputs, the T x T Grams built in row blocks.

    ``c`` and ``e`` (the teacher's) get no gradient. Passing the same tensor as ``a`` and ``b``
    gives the symmetric (layer-wise) Gram: autograd adds both gradients, as the chain rule does.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, c: Tensor, e: Tensor, weights: Tensor, block_elements: int) -> Tensor:
        ctx.save_for_backward(a, b, c, e, weights)
        ctx.block_elements = block_elements
        step = _block_rows(a.shape[0], a.shape[1], block_elements)
        total = a.new_zeros(a.shape[0])
        for start in range(0, a.shape[1], step):
            rows = slice(start, start + step)
            gap = a[:, rows] @ b.transpose(1, 2) - c[:, rows] @ e.transpose(1, 2)
            total = total + gap.square().sum(dim=(1, 2))
        return (total * weights).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, b, c, e, weights = ctx.saved_tensors
        scale = (2 * grad * weights)[:, None, None]
        grad_a = torch.zeros_like(a) if ctx.needs_input_grad[0] else None
        grad_b = torch.zeros_like(b) if ctx.needs_input_grad[1] else None
        step = _block_rows(a.shape[0], a.shape[1], ctx.block_elements)
        for start in range(0, a.shape[1], step):
            rows = slice(start, start + step)
            gap = (a[:, rows] @ b.transpose(1, 2) - c[:, rows] @ e.transpose(1, 2)) * scale
            if grad_a is not None:
                grad_a[:, rows] = gap @ b
            if grad_b is not None:
                grad_b += gap.transpose(1, 2) @ a[:, rows]
        return grad_a, grad_b, None, None, None, None


def _frames(state: Tensor, valid: Tensor) -> Tensor:
    """Each valid frame L2-normalised, padded frames zero (whatever they held), in float32."""
    state = torch.where(valid[..., None], state.float(), 0.0)
    return F.normalize(state, dim=-1)  # a zero frame stays zero (eps in the denominator)


def intra_layer_pairs(pairs: list[list[int]], student_layers: int, teacher_layers: int) -> list[tuple[int, int, int]]:
    """``(s, t_in, t)`` for each pair ``(s, t)`` of layer outputs: student layer s (state s-1 -> s) against
    the teacher's states t_in -> t.

    ``t_in`` is the teacher state that state s-1 is paired with (so a student layer standing for
    several teacher layers meets the relation across all of them); when s-1 is unpaired, the
    models' inputs (0) for s = 1, else t - 1 (right for students as deep as the teacher).
    """
    partner = {}
    for s, t in pairs:
        partner.setdefault(s, t)
    triples = []
    for s, t in pairs:
        if 1 <= s <= student_layers and 1 <= t <= teacher_layers:
            t_in = partner.get(s - 1, 0 if s == 1 else t - 1)
            if t_in < t:
                triples.append((s, t_in, t))
    return triples


def temporal_relation_loss(
    student: list[Tensor], teacher: list[Tensor], pairs: list[list[int]], padding_mask: Tensor,
    student_layers: int, teacher_layers: int, intra_layer_weight: float = 1.0,
    block_elements: int = BLOCK_ELEMENTS,
) -> Tensor:
    """Layer-wise plus ``intra_layer_weight`` x intra-layer TGM loss, summed over ``pairs``, valid frames only.

    ``student_layers``/``teacher_layers``: the models' Transformer depths (which states are layer
    outputs, for the intra-layer term). Runs in float32 outside autocast: a TGM difference is a
    small gap between values near 1, which half precision would not resolve.
    """
    valid = ~padding_mask
    counts = valid.sum(dim=1).clamp(min=1).double()
    # Mean over each utterance's T_valid² entries, then over utterances.
    weights = (1.0 / (counts * counts) / valid.shape[0]).float()
    with torch.autocast(student[0].device.type, enabled=False):
        cache: dict[tuple[int, int], Tensor] = {}

        def frames(states: list[Tensor], index: int, side: int) -> Tensor:
            if (side, index) not in cache:
                cache[side, index] = _frames(states[index], valid)
            return cache[side, index]

        total = student[0].new_zeros((), dtype=torch.float32)
        for s, t in pairs:
            x, y = frames(student, s, 0), frames(teacher, t, 1).detach()
            total = total + _GramGap.apply(x, x, y, y, weights, block_elements)
        if intra_layer_weight:
            for s, t_in, t in intra_layer_pairs(pairs, student_layers, teacher_layers):
                gap = _GramGap.apply(frames(student, s - 1, 0), frames(student, s, 0),
                                     frames(teacher, t_in, 1).detach(), frames(teacher, t, 1).detach(),
                                     weights, block_elements)
                total = total + intra_layer_weight * gap
    return total

