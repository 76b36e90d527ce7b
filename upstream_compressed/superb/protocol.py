"""The SUPERB leaderboard's profiling protocol: MACs per length bucket and shared parameters.

The leaderboard runs the upstream in eval mode under ``no_grad``, one utterance per forward (a
list of one 1-D waveform), on 32 LibriSpeech test-clean utterances of the lengths below, and
counts MACs with the rules of :mod:`.macs`. The first 8 utterances are "short", the next 8
"medium", then "long" and "longer"; ``macs`` is the sum of all 32. ``paramShared`` counts every
parameter of the upstream module.

MACs depend on shapes, not values, so the counted calls (convolutions, Linears, matmuls,
attention) skip their arithmetic and return zeros of the right shape: the 32 forwards of HuBERT
Base take seconds on a CPU instead of minutes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..model.layers import SelfAttention
from ..model.sparse import forced_execution
from .macs import LeaderboardMacCounter

# Lengths in samples (16 kHz) of the leaderboard's 32 test-clean utterances, shortest first.
LENGTHS = (
    20560, 34560, 38480, 42560, 45600, 48720, 52000, 55120,
    59120, 62720, 66400, 71200, 75200, 78640, 82800, 87520,
    92720, 98560, 104400, 111120, 118480, 125040, 132720, 142640,
    154000, 166720, 180880, 197920, 217920, 239280, 268160, 326000,
)
BUCKETS = ("macsShort", "macsMedium", "macsLong", "macsLonger")  # 8 utterances each, in order
FORM_FIELDS = ("macs", *BUCKETS, "paramShared")  # the leaderboard form's names


def _count_attention_like_fairseq(module: nn.Module, counter: LeaderboardMacCounter) -> Callable:
    """Our attention block counted as the leaderboard counts S3PRL's HuBERT attention.

    S3PRL's attention calls ``F.multi_head_attention_forward``, whose formula also counts the
    q/k/v bias adds and, when an attention dropout rate is configured, dropout (in eval mode too).
    Our block calls ``F.linear`` and ``scaled_dot_product_attention`` instead (dropout 0 in eval),
    so these two terms are added here; the rest is counted at those calls.

    WavLM needs nothing more: S3PRL's passes its gated relative position bias to the same function as
    ``attn_mask`` (whose add the formula charges with or without a mask, as our SDPA rule does), and runs
    its gate as a Linear before it, as ours does on each kept head's input chunk; the bias lookup and the
    gating are element-wise, which the fork charges nothing.
    """

    def hook(block: SelfAttention, args: tuple) -> None:
        if block.num_heads == 0:
            return
        x = args[0]
        rows = x.numel() // x.shape[-1]
        counter.extra(sum(rows * p.out_features for p in (block.q_proj, block.k_proj, block.v_proj)
                          if p.bias is not None))
        if block.dropout > 0.0:
            counter.extra(rows * block.num_heads * x.shape[-2])

    return module.register_forward_pre_hook(hook)


def utterance_macs(upstream: nn.Module, lengths: tuple[int, ...] = LENGTHS, device: str | torch.device = "cpu",
                   seed: int = 0, compute: bool = False) -> list[int]:
    """MACs of one forward per utterance (seeded random audio of ``lengths`` samples), in order.

    Counted calls skip their arithmetic (see :class:`LeaderboardMacCounter`), so this is cheap on a
    CPU; ``compute=True`` runs them for real (same counts, as a test shows).
    """
    upstream.eval()  # as the leaderboard runs it
    counter = LeaderboardMacCounter(skip_arithmetic=not compute)
    handles = [_count_attention_like_fairseq(m, counter) for m in upstream.modules() if isinstance(m, SelfAttention)]
    parameter = next(upstream.parameters(), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(seed)
    per_utterance = []
    try:
        # Dense kernels: the leaderboard counts a sparse weight's zeros (its sparse mode is off by default).
        with torch.no_grad(), forced_execution(upstream, "dense"):
            for length in lengths:
                wav = torch.randn(length, generator=generator).to(device=device, dtype=dtype)
                before = counter.macs
                with counter:
                    upstream([wav])
                per_utterance.append(counter.macs - before)
    finally:
        for handle in handles:
            handle.remove()
    return per_utterance


def form_values(per_utterance: list[int], params: int) -> dict[str, int]:
    """The leaderboard form's fields from the 32 per-utterance counts."""
    if len(per_utterance) != len(LENGTHS):
        raise ValueError(f"expected {len(LENGTHS)} utterance counts, got {len(per_utterance)}")
    values = {"macs": sum(per_utterance)}
    for i, name in enumerate(BUCKETS):
        values[name] = sum(per_utterance[8 * i: 8 * i + 8])
    values["paramShared"] = params
    return values


def superb_profile(upstream: nn.Module, device: str | torch.device = "cpu") -> dict[str, int]:
    """The leaderboard form's values for ``upstream`` (moved to ``device`` and put in eval mode)."""
    upstream = upstream.eval().to(device)
    params = sum(p.numel() for p in upstream.parameters())
    return form_values(utterance_macs(upstream, device=device), params)
