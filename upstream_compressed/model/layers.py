"""The building blocks of :class:`~upstream_compressed.model.transformer.SpeechTransformer`.

Every block takes its sizes from the config, so a pruned block is just a block built with smaller
numbers. Weight pruning's masked Linears live in :mod:`.sparse`. Structural compression is done by methods that return a smaller module
(:meth:`SelfAttention.keep_heads`, :meth:`FeedForward.keep_units`, :meth:`ConvFeatureExtractor.keep_channels`,
:meth:`EncoderLayer.without_attention`, :meth:`EncoderLayer.without_ffn`), never by masks hidden in forward.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sparse import MaskedLinear


class ConvFeatureExtractor(nn.Module):
    """wav2vec 2.0 / HuBERT convolutional front end: waveform (B, L) -> features (B, C, T).

    In ``default`` mode only the first conv is normalised, by a per-channel GroupNorm over time
    (padding included, as in S3PRL, which is why batched and single outputs differ).
    """

    def __init__(self, conv_layers: Sequence[tuple[int, int, int]], mode: str, bias: bool) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        in_channels = 1
        for i, (channels, kernel, stride) in enumerate(conv_layers):
            self.convs.append(nn.Conv1d(in_channels, channels, kernel, stride=stride, bias=bias))
            if mode == "layer_norm":
                self.norms.append(nn.LayerNorm(channels))
            elif i == 0:
                self.norms.append(nn.GroupNorm(channels, channels))
            else:
                self.norms.append(nn.Identity())
            in_channels = channels

    def keep_channels(self, layer: int, channels: Sequence[int]) -> "ConvFeatureExtractor":
        """A new front end where conv ``layer`` keeps only its output ``channels``, in that order.

        Slices that conv's filters (and bias), its norm, and the input channels of the next conv.
        Whoever consumes the last layer's features (feature norm, projection) must be sliced too.
        """
        conv = self.convs[layer]
        index = _distinct_indices(channels, conv.out_channels, f"channels of conv layer {layer}")
        if not len(index):
            raise ValueError(f"conv layer {layer} must keep at least one channel")
        smaller = ConvFeatureExtractor.__new__(ConvFeatureExtractor)
        nn.Module.__init__(smaller)
        smaller.convs, smaller.norms = nn.ModuleList(self.convs), nn.ModuleList(self.norms)  # unchanged ones shared
        smaller.convs[layer] = _select_conv(conv, out_index=index)
        norm = self.norms[layer]
        if isinstance(norm, nn.GroupNorm):  # one group per channel, so channels are independent
            smaller.norms[layer] = _select_affine(nn.GroupNorm(len(index), len(index), eps=norm.eps), norm, index)
        elif isinstance(norm, nn.LayerNorm):
            smaller.norms[layer] = _select_affine(nn.LayerNorm(len(index), eps=norm.eps), norm, index)
        if layer + 1 < len(self.convs):
            smaller.convs[layer + 1] = _select_conv(self.convs[layer + 1], in_index=index)
        return smaller

    def forward(self, wav: Tensor) -> Tensor:
        x = wav.unsqueeze(1)
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            if isinstance(norm, nn.LayerNorm):
                x = norm(x.transpose(1, 2)).transpose(1, 2)
            else:
                x = norm(x)
            x = F.gelu(x)
        return x


def _distinct_indices(indices: Sequence[int], size: int, what: str) -> Tensor:
    index = torch.as_tensor([int(i) for i in indices], dtype=torch.long)
    if len(index) and (index.min() < 0 or index.max() >= size or len(set(index.tolist())) != len(index)):
        raise ValueError(f"{what}: {index.tolist()} are not distinct indices below {size}")
    return index


def _select_conv(conv: nn.Conv1d, out_index: Tensor | None = None, in_index: Tensor | None = None) -> nn.Conv1d:
    """A new Conv1d (groups=1) with only the output channels ``out_index`` / input channels ``in_index``."""
    weight, bias = conv.weight, conv.bias
    if out_index is not None:
        weight = weight[out_index]
        bias = None if bias is None else bias[out_index]
    if in_index is not None:
        weight = weight[:, in_index]
    with torch.device("meta"):  # no random initialisation: every value is copied below
        smaller = nn.Conv1d(weight.shape[1], weight.shape[0], conv.kernel_size, stride=conv.stride,
                            padding=conv.padding, dilation=conv.dilation, bias=bias is not None)
    smaller.weight = nn.Parameter(weight.detach().clone(), requires_grad=conv.weight.requires_grad)
    if bias is not None:
        smaller.bias = nn.Parameter(bias.detach().clone(), requires_grad=conv.bias.requires_grad)
    return smaller


def _select_affine(smaller: nn.Module, norm: nn.Module, index: Tensor) -> nn.Module:
    """``smaller`` (a fresh norm) given ``norm``'s affine weight and bias at ``index``."""
    if norm.weight is not None:
        with torch.no_grad():
            smaller.weight.copy_(norm.weight[index])
            smaller.bias.copy_(norm.bias[index])
    return smaller.to(norm.weight if norm.weight is not None else torch.float32)


def select_norm(norm: nn.LayerNorm, index: Sequence[int]) -> nn.LayerNorm:
    """A LayerNorm over only the features ``index`` of ``norm``'s (a new, smaller module)."""
    index = _distinct_indices(index, norm.normalized_shape[0], "LayerNorm features")
    return _select_affine(nn.LayerNorm(len(index), eps=norm.eps, elementwise_affine=norm.weight is not None), norm, index)


class PositionalConv(nn.Module):
    """Convolutional relative positional embedding, weight-normalised over the kernel axis.

    The weight is kept as (``weight_g``, ``weight_v``) like the checkpoints store it, so converting
    back to S3PRL's format is exact.
    """

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.kernel, self.groups = kernel, groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.randn(dim, dim // groups, kernel) * math.sqrt(4 / (kernel * dim)))
        self.bias = nn.Parameter(torch.zeros(dim))

    def weight(self) -> Tensor:
        norm = self.weight_v.norm(dim=(0, 1), keepdim=True)
        return self.weight_v * (self.weight_g / norm)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        y = F.conv1d(x.transpose(1, 2), self.weight(), self.bias, padding=self.kernel // 2, groups=self.groups)
        if self.kernel % 2 == 0:  # an even kernel with padding k//2 yields one extra frame
            y = y[:, :, :-1]
        return F.gelu(y).transpose(1, 2)


class LowRankLinear(nn.Module):
    """A Linear W (out x in) replaced by ``up(down(x))``, i.e. W ~ B·A with B (out x r), A (r x in)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @property
    def bias(self) -> Tensor | None:
        return self.up.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


def effective_weight(linear: nn.Module) -> Tensor:
    """The (out x in) matrix a dense, masked or low-rank Linear applies."""
    if isinstance(linear, LowRankLinear):
        return linear.up.weight @ linear.down.weight
    if isinstance(linear, MaskedLinear):
        return linear.weight * linear.mask
    return linear.weight


def top_singular_subspace(weight: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U_r, s_r, V_r) of ``weight``'s top ``rank`` singular triplets, in float64.

    Computed from the eigendecomposition of the smaller Gram matrix: exact to float64 precision for
    the singular values that matter, and several times faster on CPU than a full SVD.
    """
    w = weight.detach().double()
    tall = w.shape[0] >= w.shape[1]
    gram = w.T @ w if tall else w @ w.T
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    values = eigenvalues.flip(0)[:rank].clamp_min(0)
    vectors = eigenvectors.flip(1)[:, :rank]
    singular = values.sqrt()
    inverse = torch.where(singular > 0, 1 / singular, torch.zeros_like(singular))
    if tall:  # vectors are right singular vectors V; U = W V / s
        return (w @ vectors) * inverse, singular, vectors
    return vectors, singular, (w.T @ vectors) * inverse


def factorize(linear: nn.Module, rank: int) -> LowRankLinear:
    """The best rank-``rank`` approximation (truncated SVD), its singular values split evenly over B and A."""
    weight = effective_weight(linear).detach()
    u, s, v = top_singular_subspace(weight, rank)
    root = s.sqrt()
    factored = LowRankLinear(weight.shape[1], weight.shape[0], rank, bias=linear.bias is not None)
    with torch.no_grad():
        factored.up.weight.copy_(u * root)
        factored.down.weight.copy_((v * root).T)
        if linear.bias is not None:
            factored.up.bias.copy_(linear.bias)
    return factored.to(device=weight.device, dtype=weight.dtype)


def make_linear(in_features: int, out_features: int, rank: int | None, sparse: bool = False) -> nn.Module:
    """A dense Linear, a low-rank one when ``rank`` is given, or a masked one when ``sparse``."""
    if rank is not None and sparse:
        raise ValueError("a Linear is either low-rank or sparse (masked), not both")
    if rank is not None:
        return LowRankLinear(in_features, out_features, rank)
    return MaskedLinear(in_features, out_features) if sparse else nn.Linear(in_features, out_features)


def select_rows(linear: nn.Module, index: Tensor) -> nn.Module:
    """Keep the output features ``index`` of a dense or low-rank Linear (a new, smaller module)."""
    if isinstance(linear, LowRankLinear):
        smaller = LowRankLinear(linear.in_features, len(index), linear.rank, bias=linear.up.bias is not None)
        smaller.down.load_state_dict(linear.down.state_dict())
        smaller.up = select_rows(linear.up, index)
        return smaller
    kind = MaskedLinear if isinstance(linear, MaskedLinear) else nn.Linear
    smaller = kind(linear.in_features, len(index), bias=linear.bias is not None)
    with torch.no_grad():
        smaller.weight.copy_(linear.weight[index])
        if linear.bias is not None:
            smaller.bias.copy_(linear.bias[index])
        if isinstance(linear, MaskedLinear):
            smaller.mask.copy_(linear.mask[index])
    return smaller.to(linear.weight)


def select_columns(linear: nn.Module, index: Tensor) -> nn.Module:
    """Keep the input features ``index`` of a dense or low-rank Linear (a new, smaller module)."""
    if isinstance(linear, LowRankLinear):
        smaller = LowRankLinear(len(index), linear.out_features, linear.rank, bias=linear.up.bias is not None)
        smaller.up.load_state_dict(linear.up.state_dict())
        smaller.down = select_columns(linear.down, index)
        return smaller
    kind = MaskedLinear if isinstance(linear, MaskedLinear) else nn.Linear
    smaller = kind(len(index), linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        smaller.weight.copy_(linear.weight[:, index])
        if linear.bias is not None:
            smaller.bias.copy_(linear.bias)
        if isinstance(linear, MaskedLinear):
            smaller.mask.copy_(linear.mask[:, index])
    return smaller.to(linear.weight)


class RelativePositionBias(nn.Module):
    """WavLM's bucketed relative position bias: one learned score per (distance bucket, original head).

    Computed once per forward for all layers, as a (heads, T, T) tensor to add to attention scores.
    Distances below ``num_buckets // 4`` get a bucket each per direction; longer ones share buckets
    spaced logarithmically up to ``max_distance``, beyond which they all share the last one.
    """

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int) -> None:
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.weight = nn.Parameter(torch.randn(num_buckets, num_heads) * math.sqrt(2 / (num_buckets + num_heads)))

    def buckets(self, time: int, device: torch.device) -> Tensor:
        """(T, T) bucket of key frame j relative to query frame i (j - i); later keys use the upper half."""
        positions = torch.arange(time, dtype=torch.long, device=device)
        offset = positions[None, :] - positions[:, None]
        half = self.num_buckets // 2
        exact = half // 2
        distance = offset.abs()
        # The same float operations, in the same order, as WavLM, so each distance lands in its bucket.
        spread = torch.log(distance.clamp_min(1).float() / exact) / math.log(self.max_distance / exact) * (half - exact)
        far = (exact + spread.to(torch.long)).clamp_max(half - 1)
        return (offset > 0).long() * half + torch.where(distance < exact, distance, far)

    def forward(self, time: int) -> Tensor:
        """(heads, T, T): the bias of every head for ``time`` frames."""
        return F.embedding(self.buckets(time, self.weight.device), self.weight).permute(2, 0, 1)


GATE_OUTPUTS = 8  # WavLM's gate Linear: two groups of 4 outputs, each summed, give the gate's two sigmoids


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``.

    Heads are independent slices of q/k/v rows and out_proj columns, so a layer may keep any
    number of them, zero included (then the block adds only out_proj's bias).

    With WavLM's relative position bias (``forward``'s ``position_bias``, shared by all layers, one row
    per original head) ``head_ids`` names the original head of each kept one, and ``gate_input_dim``
    (> 0) adds WavLM's gate: per head and query frame, a scale of the bias computed from that head's
    chunk of the block's input (chunks of ``gate_input_dim`` features, one per original head).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        dropout: float = 0.0,
        ranks: dict[str, int] | None = None,
        sparse: Sequence[str] = (),
        head_ids: Sequence[int] | None = None,
        gate_input_dim: int = 0,
    ) -> None:
        super().__init__()
        ranks = ranks or {}
        self.num_heads, self.head_dim, self.dropout = num_heads, head_dim, dropout
        self.head_ids = None if head_ids is None else [int(h) for h in head_ids]
        if self.head_ids is not None and len(self.head_ids) != num_heads:
            raise ValueError(f"{len(self.head_ids)} head ids for {num_heads} heads")
        inner = num_heads * head_dim
        self.q_proj = make_linear(embed_dim, inner, ranks.get("q_proj"), "q_proj" in sparse)
        self.k_proj = make_linear(embed_dim, inner, ranks.get("k_proj"), "k_proj" in sparse)
        self.v_proj = make_linear(embed_dim, inner, ranks.get("v_proj"), "v_proj" in sparse)
        self.out_proj = make_linear(inner, embed_dim, ranks.get("out_proj"), "out_proj" in sparse)
        # One gate Linear shared by all heads (each applies it to its own input chunk), one scale per head.
        self.gate = nn.Linear(gate_input_dim, GATE_OUTPUTS) if gate_input_dim else None
        self.gate_scale = nn.Parameter(torch.ones(num_heads)) if gate_input_dim else None

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, position_bias: Tensor | None = None) -> Tensor:
        """x: (B, T, D); padding_mask: (B, T), True on padded frames (never attended to);
        position_bias: (original heads, T, T), added to the scores of the heads this block keeps."""
        batch, time, _ = x.shape
        if self.num_heads == 0:  # a fresh tensor, not a view of the bias (autograd hooks need one)
            return x.new_zeros(batch, time, self.out_proj.out_features) + self.out_proj.bias

        def split_heads(t: Tensor) -> Tensor:
            return t.view(batch, time, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = split_heads(self.q_proj(x)), split_heads(self.k_proj(x)), split_heads(self.v_proj(x))
        if position_bias is None:
            mask = None if padding_mask is None else ~padding_mask[:, None, None, :]
        else:
            mask = self.biased_mask(x, padding_mask, position_bias).to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, time, self.num_heads * self.head_dim))

    def biased_mask(self, x: Tensor, padding_mask: Tensor | None, position_bias: Tensor) -> Tensor:
        """The float mask (B or 1, H, T, T) added to the scaled scores: this block's rows of the bias, gated,
        -inf on padded keys (head analysis recomputes the probabilities with it)."""
        ids = self.head_ids if self.head_ids is not None else list(range(self.num_heads))
        index = None if ids == list(range(position_bias.shape[0])) else torch.tensor(ids, device=x.device)
        bias = position_bias if index is None else position_bias.index_select(0, index)
        if self.gate is None:
            mask = bias.unsqueeze(0)
        else:
            chunks = x.unflatten(-1, (-1, self.gate.in_features))  # (B, T, original heads, chunk)
            if index is not None:
                chunks = chunks.index_select(2, index)
            first, second = torch.sigmoid(self.gate(chunks).unflatten(-1, (2, GATE_OUTPUTS // 2)).sum(-1)).unbind(-1)
            scale = first * (second * self.gate_scale - 1.0) + 2.0  # (B, T, H): WavLM's gate, in its order
            mask = scale.transpose(1, 2).unsqueeze(-1) * bias  # per query frame: (B, H, T, 1) x (H, T, T)
        if padding_mask is not None:
            mask = mask.masked_fill(padding_mask[:, None, None, :], float("-inf"))
        return mask

    def keep_heads(self, heads: Sequence[int]) -> "SelfAttention":
        """A new attention block with only ``heads`` (indices into this block's heads), in that order."""
        heads = [int(h) for h in heads]
        if any(h < 0 or h >= self.num_heads for h in heads) or len(set(heads)) != len(heads):
            raise ValueError(f"head indices {heads} are not distinct indices below {self.num_heads}")
        index = torch.tensor(
            [h * self.head_dim + i for h in heads for i in range(self.head_dim)], dtype=torch.long
        )
        smaller = SelfAttention.__new__(SelfAttention)
        nn.Module.__init__(smaller)
        smaller.num_heads, smaller.head_dim, smaller.dropout = len(heads), self.head_dim, self.dropout
        # Indices compose: the kept heads' original ids, so the shared bias and the gate's chunks follow them.
        smaller.head_ids = None if self.head_ids is None else [self.head_ids[h] for h in heads]
        smaller.q_proj = select_rows(self.q_proj, index)
        smaller.k_proj = select_rows(self.k_proj, index)
        smaller.v_proj = select_rows(self.v_proj, index)
        smaller.out_proj = select_columns(self.out_proj, index)
        smaller.gate = None if self.gate is None else copy.deepcopy(self.gate)
        smaller.gate_scale = None if self.gate_scale is None else nn.Parameter(
            self.gate_scale.detach()[torch.tensor(heads, dtype=torch.long, device=self.gate_scale.device)].clone(),
            requires_grad=self.gate_scale.requires_grad,
        )
        return smaller


class FeedForward(nn.Module):
    """Position-wise FFN ``fc2(dropout(gelu(fc1(x))))``; its hidden units can be pruned."""

    def __init__(
        self, embed_dim: int, ffn_dim: int, activation_dropout: float = 0.0, ranks: dict[str, int] | None = None,
        sparse: Sequence[str] = (),
    ) -> None:
        super().__init__()
        ranks = ranks or {}
        self.fc1 = make_linear(embed_dim, ffn_dim, ranks.get("fc1"), "fc1" in sparse)
        self.fc2 = make_linear(ffn_dim, embed_dim, ranks.get("fc2"), "fc2" in sparse)
        self.activation_dropout = activation_dropout

    @property
    def ffn_dim(self) -> int:
        return self.fc1.out_features

    def forward(self, x: Tensor) -> Tensor:
        if self.ffn_dim == 0:
            return x.new_zeros(*x.shape[:-1], self.fc2.out_features) + self.fc2.bias
        hidden = F.dropout(F.gelu(self.fc1(x)), self.activation_dropout, self.training)
        return self.fc2(hidden)

    def keep_units(self, units: Sequence[int]) -> "FeedForward":
        """A new FFN with only the hidden ``units`` (fc1 rows, fc2 columns), in that order."""
        index = torch.as_tensor([int(u) for u in units], dtype=torch.long)
        if len(index) and (index.min() < 0 or index.max() >= self.ffn_dim or len(set(index.tolist())) != len(index)):
            raise ValueError(f"unit indices are not distinct indices below {self.ffn_dim}")
        smaller = FeedForward.__new__(FeedForward)
        nn.Module.__init__(smaller)
        smaller.activation_dropout = self.activation_dropout
        smaller.fc1 = select_rows(self.fc1, index)
        smaller.fc2 = select_columns(self.fc2, index)
        return smaller


class EncoderLayer(nn.Module):
    """One Transformer layer, post-LayerNorm (HuBERT Base) or pre-LayerNorm (HuBERT Large).

    A removed sublayer (``attention`` or ``feed_forward`` None) leaves only its residual path. Both
    LayerNorms always stay, as in DPHuBERT: a post-LN layer still normalises after each removed
    sublayer; a pre-LN layer keeps the unused norm's few parameters so checkpoints map one to one.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        ffn_dim: int,
        layer_norm_first: bool,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        ranks: dict[str, int] | None = None,
        sparse: Sequence[str] = (),
        attention: bool = True,
        ffn: bool = True,
        head_ids: Sequence[int] | None = None,
        gate_input_dim: int = 0,
    ) -> None:
        super().__init__()
        self.layer_norm_first, self.dropout = layer_norm_first, dropout
        self.attention = (
            SelfAttention(embed_dim, num_heads, head_dim, attention_dropout, ranks, sparse, head_ids, gate_input_dim)
            if attention else None
        )
        self.attention_norm = nn.LayerNorm(embed_dim)
        self.feed_forward = FeedForward(embed_dim, ffn_dim, activation_dropout, ranks, sparse) if ffn else None
        self.final_norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, position_bias: Tensor | None = None) -> Tensor:
        """``position_bias``: WavLM's shared relative position bias (original heads, T, T), if the model has one."""
        drop = lambda t: F.dropout(t, self.dropout, self.training)  # noqa: E731
        if self.layer_norm_first:
            if self.attention is not None:
                x = x + drop(self.attention(self.attention_norm(x), padding_mask, position_bias))
            if self.feed_forward is not None:
                x = x + drop(self.feed_forward(self.final_norm(x)))
            return x
        if self.attention is not None:
            x = x + drop(self.attention(x, padding_mask, position_bias))
        x = self.attention_norm(x)
        if self.feed_forward is not None:
            x = x + drop(self.feed_forward(x))
        return self.final_norm(x)

    def without_attention(self) -> "EncoderLayer":
        """A new layer without the attention sublayer (its norms and FFN are shared with this one)."""
        return self._without("attention")

    def without_ffn(self) -> "EncoderLayer":
        """A new layer without the feed-forward sublayer (its norms and attention are shared with this one)."""
        return self._without("feed_forward")

    def _without(self, sublayer: str) -> "EncoderLayer":
        smaller = EncoderLayer.__new__(EncoderLayer)
        nn.Module.__init__(smaller)
        smaller.layer_norm_first, smaller.dropout = self.layer_norm_first, self.dropout
        for name in ("attention", "attention_norm", "feed_forward", "final_norm"):  # registration order = key order
            setattr(smaller, name, None if name == sublayer else getattr(self, name))
        smaller.train(self.training)
        return smaller


class PredictionHeads(nn.Module):
    """DistilHuBERT's heads: one shared Linear + GELU, then one Linear per predicted teacher layer."""

    def __init__(self, embed_dim: int, num_heads: int, inter_dim: int, out_dim: int) -> None:
        super().__init__()
        self.num_heads, self.inter_dim = num_heads, inter_dim
        self.shared = nn.Linear(embed_dim, inter_dim * num_heads)
        bound = inter_dim**-0.5
        self.weight = nn.Parameter(torch.empty(num_heads, inter_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_heads, out_dim).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, T, D) -> one (B, T, out_dim) tensor per head."""
        hidden = F.gelu(self.shared(x)).unflatten(-1, (self.num_heads, self.inter_dim))
        out = torch.einsum("btni,nio->btno", hidden, self.weight) + self.bias
        return list(out.unbind(dim=2))
