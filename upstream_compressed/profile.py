"""Honest costs of a model: parameters and MACs (counted by torch's FlopCounterMode), wall-clock time.

For weight-pruned models there are two MAC counts: dense (what a dense kernel computes, zeros
included) and effective (only the multiplications by kept, non-zero weights).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from .model import SpeechTransformer
from .model.sparse import forced_execution, masked_linears

SAMPLE_RATE = 16000


def _register_cpu_attention_formula() -> None:
    """FlopCounterMode has no formula for the fused CPU attention kernel; without one it counts 0."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    from torch.utils.flop_counter import flop_registry

    if op in flop_registry or op.default in flop_registry:
        return

    @register_flop_formula(op)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_attention_formula()


def count_macs(model: SpeechTransformer, seconds: float = 10.0) -> int:
    """Multiply-accumulates of one forward pass on ``seconds`` of audio (FLOPs / 2), pruned weights included."""
    wav = torch.zeros(1, int(seconds * SAMPLE_RATE), device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    # Dense kernels, so the count is the dense one (the counter has no formulas for sparse kernels).
    with torch.no_grad(), forced_execution(model, "dense"), FlopCounterMode(display=False) as counter:
        model(wav)
    model.train(was_training)
    return counter.get_total_flops() // 2


def count_effective_macs(model: SpeechTransformer, seconds: float = 10.0) -> int:
    """MACs by non-zero weights only: dense MACs minus, per masked Linear, its input rows x pruned weights."""
    rows: dict[str, int] = {}

    def recorder(name: str):
        def hook(module, inputs, output) -> None:
            rows[name] = rows.get(name, 0) + inputs[0].numel() // module.in_features
        return hook

    modules = dict(masked_linears(model))
    hooks = [module.register_forward_hook(recorder(name)) for name, module in modules.items()]
    try:
        dense = count_macs(model, seconds)
    finally:
        for hook in hooks:
            hook.remove()
    pruned = sum(rows.get(name, 0) * module.num_pruned for name, module in modules.items())
    return dense - pruned


def count_nonzero_parameters(model: SpeechTransformer) -> int:
    """Parameters minus the weights that masks prune (what a sparse format has to store)."""
    pruned = sum(module.num_pruned for _, module in masked_linears(model))
    return model.num_parameters() - pruned


def median_forward_seconds(model: SpeechTransformer, wav: torch.Tensor, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``model(wav)`` after ``warmup`` untimed runs."""
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if wav.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(wav)
            if wav.is_cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)
