"""The SUPERB leaderboard's MAC counting rules, as a ``TorchFunctionMode``.

The leaderboard profiles upstreams with a fork of DeepSpeed's flops profiler (``superb-challenge``
branch). It wraps torch's Python-level functions and counts, for each call, a formula of its
argument shapes; a call made inside another wrapped call is not counted again (only the outermost
call counts). This module applies the same formulas to the same calls:

- ``F.linear``: input numel x out_features (the bias adds nothing).
- ``F.conv1d/2d/3d``: output positions (from the padding, before any trimming) x in_channels x
  out_channels / groups x kernel size; transposed convs: input positions x the same product.
- ``matmul``/``mm``/``bmm`` (and ``@``): numel of the first operand x last dim of the second;
  ``addmm``: numel of mat1 x last dim of mat2; ``einsum``: numpy's optimal contraction cost / 2.
- ``F.multi_head_attention_forward`` (what S3PRL's HuBERT/wav2vec 2.0/DistilHuBERT/WavLM attention
  calls): the projections and both attention matmuls, and also, by the fork's formula, one MAC per
  in-projection bias add (per input element of q, k and v), per query scaling, per attention-mask
  add (whether or not a mask is given: WavLM gives its gated position bias) and per dropout
  (whenever ``dropout_p`` > 0, in eval mode too), and two per softmax element.
- Everything else (element-wise arithmetic, activations, norms, softmax, pooling) adds no MACs.

Two extensions beyond the fork, for code it predates: ``baddbmm`` counts like ``bmm``, and
``F.scaled_dot_product_attention`` counts as the attention part of the fork's MHA formula (both
matmuls, mask, softmax x 2, query scaling, and dropout when ``dropout_p`` > 0).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map


def _numel(shape: Any) -> int:
    return math.prod(int(s) for s in shape)


def _linear(input, weight, bias=None) -> int:
    return input.numel() * weight.shape[0]


def _conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> int:
    spatial = weight.dim() - 2
    batch = input.shape[0] if input.dim() == weight.dim() else 1  # unbatched input has no batch axis
    sizes = list(input.shape[-spatial:])
    kernel = list(weight.shape[2:])

    def per_dim(value: Any) -> list[int]:
        return list(value) if isinstance(value, (tuple, list)) else [value] * spatial

    strides, dilations = per_dim(stride), per_dim(dilation)
    if padding == "same":
        outputs = sizes
    else:
        pads = [0] * spatial if padding == "valid" else per_dim(padding)
        outputs = [
            (size + 2 * pad - (dil * (k - 1) + 1)) // st + 1
            for size, pad, dil, k, st in zip(sizes, pads, dilations, kernel, strides)
        ]
    in_channels = weight.shape[1] * groups
    return batch * _numel(outputs) * _numel(kernel) * in_channels * (weight.shape[0] // groups)


def _conv_transpose(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1) -> int:
    spatial = weight.dim() - 2
    batch = input.shape[0] if input.dim() == weight.dim() else 1
    in_channels, out_per_group = weight.shape[0], weight.shape[1]
    return batch * _numel(input.shape[-spatial:]) * _numel(weight.shape[2:]) * in_channels * out_per_group


def _matmul(input, other, *args, **kwargs) -> int:
    return input.numel() * other.shape[-1]


def _rmatmul(input, other, *args, **kwargs) -> int:  # other @ input
    return other.numel() * input.shape[-1]


def _addmm(input, mat1, mat2, *args, **kwargs) -> int:
    return mat1.numel() * mat2.shape[-1]


def _einsum(equation, *operands) -> int:
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(equation, str):
        raise NotImplementedError("the SUPERB MAC counter supports einsum's string form only")
    arrays = [np.broadcast_to(np.zeros(()), tuple(o.shape)) for o in operands]  # shapes only, no memory
    report = np.einsum_path(equation.replace(" ", ""), *arrays, optimize="optimal")[1]
    for line in report.splitlines():
        if "optimized flop" in line.lower():
            return int(float(line.split(":")[-1])) >> 1
    raise NotImplementedError(f"numpy gave no flop count for einsum {equation!r}")


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _multi_head_attention(*args, **kwargs) -> int:
    a = _MHA_SIGNATURE.bind(*args, **kwargs).arguments
    query, key, num_heads = a["query"], a["key"], a["num_heads"]
    batch = query.shape[1] if query.dim() == 3 else 1
    embed_dim = query.shape[-1]
    head_dim = embed_dim // num_heads
    tgt_len, src_len = query.shape[0], key.shape[0]
    if a.get("use_separate_proj_weight", False):
        macs = query.numel() * a["q_proj_weight"].shape[0] + 2 * key.numel() * a["k_proj_weight"].shape[0]
    else:
        macs = query.numel() * embed_dim + 2 * key.numel() * embed_dim
    if a.get("in_proj_bias") is not None:
        macs += query.numel() + key.numel() + a["value"].numel()  # bias adds, counted per input element
    macs += query.numel()  # query scaling
    scores = batch * num_heads * tgt_len * src_len
    macs += 2 * scores * head_dim  # q k^T and attention x v
    macs += scores  # attention-mask add (counted whether or not a mask is given)
    macs += 2 * scores  # softmax
    if a["dropout_p"] > 0.0:  # the fork counts dropout whenever a rate is set, in eval mode too
        macs += scores
    macs += batch * tgt_len * embed_dim * a["out_proj_weight"].shape[0]  # out-projection
    return macs


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, *args, **kwargs) -> int:
    scores = query.numel() // query.shape[-1] * key.shape[-2]  # batch x heads x L x S
    macs = scores * query.shape[-1] + scores * value.shape[-1]  # q k^T and attention x v
    macs += 3 * scores + query.numel()  # mask add, softmax x 2, query scaling (as in the fork's MHA)
    if dropout_p > 0.0:
        macs += scores
    return macs


RULES: dict[Callable, Callable[..., int]] = {
    F.linear: _linear,
    F.conv1d: _conv,
    F.conv2d: _conv,
    F.conv3d: _conv,
    F.conv_transpose1d: _conv_transpose,
    F.conv_transpose2d: _conv_transpose,
    F.conv_transpose3d: _conv_transpose,
    torch.matmul: _matmul,
    torch.Tensor.matmul: _matmul,
    torch.Tensor.__matmul__: _matmul,
    torch.Tensor.__rmatmul__: _rmatmul,
    torch.mm: _matmul,
    torch.Tensor.mm: _matmul,
    torch.bmm: _matmul,
    torch.Tensor.bmm: _matmul,
    torch.addmm: _addmm,
    torch.Tensor.addmm: _addmm,
    torch.baddbmm: _addmm,
    torch.Tensor.baddbmm: _addmm,
    torch.einsum: _einsum,
    F.multi_head_attention_forward: _multi_head_attention,
    F.scaled_dot_product_attention: _sdpa,
}


def _zeros_like_result(func: Callable, args: tuple, kwargs: dict) -> Any:
    """``func``'s result as zeros of the right shapes, without its arithmetic (shapes come from a meta run)."""
    device = next(t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
    to_meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
    result = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
    return tree_map(
        lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).zero_()
        if isinstance(t, torch.Tensor) else t,
        result,
    )


class LeaderboardMacCounter(TorchFunctionMode):
    """Counts MACs of the torch calls made inside ``with`` by the leaderboard's rules.

    While a call is handled the mode is off, so calls made inside it (``F.linear`` inside
    ``F.multi_head_attention_forward``) are not counted twice: only the outermost call counts, as
    in the leaderboard's profiler. ``extra`` adds MACs that a caller counts by other means.

    ``skip_arithmetic``: counted calls return zeros of their result's shape instead of computing
    it (MACs depend on shapes only), which makes counting a long utterance cheap; other calls run.
    """

    def __init__(self, skip_arithmetic: bool = False) -> None:
        super().__init__()
        self.macs = 0
        self.skip_arithmetic = skip_arithmetic

    def extra(self, macs: int) -> None:
        self.macs += int(macs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = RULES.get(func)
        if rule is None:
            return func(*args, **kwargs)
        self.macs += int(rule(*args, **kwargs))
        if self.skip_arithmetic and "out" not in kwargs:
            return _zeros_like_result(func, args, kwargs)
        return func(*args, **kwargs)
