"""Data-driven importance of attention heads and FFN units (Michel et al., 2019, without labels).

Each head (unit) gets a gate xi = 1 that multiplies its output. For a label-free model the loss is
a random projection r of all hidden states (what SUPERB's weighted sum sees), L = <r, f(x)>, so
dL/dxi is the first-order change of that projection when the head is removed. Averaging (dL/dxi)^2
over audio and projections estimates E||df/dxi||^2: the expected squared change of the model's
representation. The score is its square root.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from tqdm import tqdm

from ..audio import load_audio, sample_audio
from ..model import SpeechTransformer


def _gate_hooks(model: SpeechTransformer, kind: str) -> tuple[list[Tensor], list[Any]]:
    """Attach gates as forward pre-hooks on out_proj (heads) or fc2 (units): no change to the model code."""
    gates, handles = [], []
    for layer in model.layers:
        if (layer.attention if kind == "heads" else layer.feed_forward) is None:  # sublayer removed: no items
            gates.append(torch.zeros(0, requires_grad=True, device=next(model.parameters()).device))
            continue
        if kind == "heads":
            module, size, group = layer.attention.out_proj, layer.attention.num_heads, layer.attention.head_dim
        else:
            module, size, group = layer.feed_forward.fc2, layer.feed_forward.ffn_dim, 1
        gate = torch.ones(size, requires_grad=True, device=next(model.parameters()).device)

        def hook(_module, inputs, gate=gate, group=group):
            (x,) = inputs
            return (x * gate.repeat_interleave(group),)

        gates.append(gate)
        handles.append(module.register_forward_pre_hook(hook))
    return gates, handles


def data_driven_scores(
    model: SpeechTransformer,
    kind: str,
    audio_dir: str,
    max_utterances: int = 32,
    max_seconds: float = 8.0,
    batch_size: int = 4,
    projections: int = 4,
    seed: int = 0,
) -> list[Tensor]:
    """Per layer, one importance score per head (``kind="heads"``) or FFN unit (``kind="units"``)."""
    return gate_importance(model, lambda m: _gate_hooks(m, kind), kind, audio_dir, max_utterances, max_seconds,
                           batch_size, projections, seed)


def gate_importance(
    model: SpeechTransformer,
    attach_gates: Callable[[SpeechTransformer], tuple[list[Tensor], list[Any]]],
    what: str,
    audio_dir: str,
    max_utterances: int = 32,
    max_seconds: float = 8.0,
    batch_size: int = 4,
    projections: int = 4,
    seed: int = 0,
) -> list[Tensor]:
    """sqrt E[(dL/dxi)^2] for every gate that ``attach_gates(model)`` puts on the model (gates, hook handles).

    The gates are removed again afterwards; the model's parameters are left trainable, as found.
    """
    files = sample_audio(audio_dir, max_utterances, seed)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gates, handles = attach_gates(model)
    squares = [torch.zeros_like(g) for g in gates]
    count = 0
    try:
        batches = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
        for batch in tqdm(batches, desc=f"scoring {what}", unit="batch", leave=False):
            wavs = [load_audio(f, max_seconds) for f in batch]
            lengths = torch.tensor([len(w) for w in wavs])
            padded = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)
            states, padding = model(padded.to(device), lengths.to(device))
            valid = (~padding)[..., None].float()
            for _ in range(projections):
                loss = sum(
                    (state * valid * torch.randn(state.shape, generator=generator).to(state)).sum()
                    for state in states
                )
                grads = torch.autograd.grad(loss, gates, retain_graph=True, allow_unused=True)
                for square, grad in zip(squares, grads):
                    if grad is not None:  # a layer with no heads/units left never uses its gate
                        square += grad.detach() ** 2
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        for p in model.parameters():
            p.requires_grad_(True)
        model.train(was_training)
    return [(square / max(count, 1)).sqrt().cpu() for square in squares]
