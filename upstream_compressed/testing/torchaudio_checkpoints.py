"""Tiny checkpoints in torchaudio's wav2vec2 layout, as torchaudio and DPHuBERT write them.

Models are built with torchaudio's own ``torchaudio.models.wav2vec2_model``. What that factory cannot
express (DPHuBERT's per-layer heads and FFN widths, removed sublayers, the ``dummy_weight`` scale of
the conv features) is made by editing the stock modules physically: smaller q/k/v/out Linears with
the ``num_heads`` attribute set, smaller FFN Linears, a sublayer replaced by one that adds nothing,
and the scale as a parameter of the stock ``FeatureExtractor`` applied by a forward hook. The state
dict of such a model has exactly the keys of DPHuBERT's, so :func:`torchaudio_reference` is the
reference that parity tests compare against.

WavLM: :func:`make_torchaudio_wavlm_checkpoint` writes torchaudio's own ``wavlm_model``;
:func:`make_dpwavlm_checkpoint` slices such a file as DPHuBERT's ``prune()`` does (kept heads' q/k/v
rows and out_proj columns, FFN units, removed sublayers' tensors dropped, ``gru_rel_pos_const`` left at
full width) and saves it with DPHuBERT's ``wavlm_model`` arguments, so the unpruned torchaudio model
with the removed parts zeroed is an independent reference for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# HuBERT's total stride (320) and receptive field (400 samples), with narrow, unequal channels.
TINY_CONV = [(16, 10, 5), (24, 3, 2), (20, 3, 2), (20, 3, 2), (18, 3, 2), (20, 2, 2), (22, 2, 2)]


def stock_config(*, layers: int = 3, dim: int = 48, heads: int = 3, ffn: int = 40,
                 conv_layers: list[tuple[int, int, int]] | None = None, extractor_mode: str = "group_norm",
                 layer_norm_first: bool = False, conv_bias: bool = False, conv_pos: int = 15,
                 conv_pos_groups: int = 3) -> dict[str, Any]:
    """Keyword arguments of torchaudio's own ``wav2vec2_model`` (uniform ints)."""
    return dict(
        extractor_mode=extractor_mode, extractor_conv_layer_config=list(conv_layers or TINY_CONV),
        extractor_conv_bias=conv_bias, encoder_embed_dim=dim, encoder_projection_dropout=0.1,
        encoder_pos_conv_kernel=conv_pos, encoder_pos_conv_groups=conv_pos_groups, encoder_num_layers=layers,
        encoder_num_heads=heads, encoder_attention_dropout=0.1, encoder_ff_interm_features=ffn,
        encoder_ff_interm_dropout=0.0, encoder_dropout=0.1, encoder_layer_norm_first=layer_norm_first,
        encoder_layer_drop=0.05, aux_num_out=None,
    )


def dphubert_config(stock: dict[str, Any], *, heads: list[int] | None = None, ffn: list[int] | None = None,
                    use_attention: list[bool] | None = None, use_feed_forward: list[bool] | None = None,
                    conv_layers: list[tuple[int, int, int]] | None = None) -> dict[str, Any]:
    """DPHuBERT's keyword arguments (per-layer lists) for the structure ``stock`` pruned as given."""
    count = stock["encoder_num_layers"]
    config = dict(stock)
    config.update(
        extractor_conv_layer_config=list(conv_layers or stock["extractor_conv_layer_config"]),
        encoder_num_heads=list(heads or [stock["encoder_num_heads"]] * count),
        encoder_head_dim=stock["encoder_embed_dim"] // stock["encoder_num_heads"],
        encoder_ff_interm_features=list(ffn or [stock["encoder_ff_interm_features"]] * count),
        encoder_use_attention=list(use_attention or [True] * count),
        encoder_use_feed_forward=list(use_feed_forward or [True] * count),
        normalize_waveform=False,
        extractor_prune_conv_channels=False, encoder_prune_attention_heads=False,
        encoder_prune_attention_layer=False, encoder_prune_feed_forward_intermediate=False,
        encoder_prune_feed_forward_layer=False,
    )
    return config


class NoSublayer(nn.Module):
    """Stands in for a removed attention or FFN sublayer in a stock EncoderLayer: it adds nothing."""

    def __init__(self, embed_dim: int, attention: bool) -> None:
        super().__init__()
        self.embed_dim, self.attention = embed_dim, attention

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        zero = torch.zeros_like(x)
        return (zero, None) if self.attention else zero


def _per_layer(value: Any, count: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


def torchaudio_reference(config: dict[str, Any], dummy_weight: bool | None = None) -> nn.Module:
    """A stock torchaudio ``Wav2Vec2Model`` of this (stock or DPHuBERT) config, edited where needed.

    ``dummy_weight`` (default: whether ``config`` is DPHuBERT's) adds DPHuBERT's conv-feature scale.
    """
    from torchaudio.models import wav2vec2_model

    count, dim = config["encoder_num_layers"], config["encoder_embed_dim"]
    heads = _per_layer(config["encoder_num_heads"], count)
    ffn = _per_layer(config["encoder_ff_interm_features"], count)
    head_dim = config.get("encoder_head_dim", dim // heads[0])
    use_attention = _per_layer(config.get("encoder_use_attention", True), count)
    use_ffn = _per_layer(config.get("encoder_use_feed_forward", True), count)
    stock_keys = stock_config().keys()
    stock = {k: config[k] for k in stock_keys}
    stock.update(encoder_num_heads=dim // head_dim, encoder_ff_interm_features=max(ffn + [1]))
    model = wav2vec2_model(**stock)
    for i, layer in enumerate(model.encoder.transformer.layers):
        if not use_attention[i]:
            layer.attention = NoSublayer(dim, attention=True)
        elif heads[i] != dim // head_dim:
            attention, inner = layer.attention, heads[i] * head_dim
            attention.q_proj, attention.k_proj, attention.v_proj = (nn.Linear(dim, inner) for _ in range(3))
            attention.out_proj = nn.Linear(inner, dim)
            attention.num_heads = heads[i]  # its head_dim stays: torchaudio's forward reads both
        if not use_ffn[i]:
            layer.feed_forward = NoSublayer(dim, attention=False)
        elif ffn[i] != stock["encoder_ff_interm_features"]:
            layer.feed_forward.intermediate_dense = nn.Linear(dim, ffn[i])
            layer.feed_forward.output_dense = nn.Linear(ffn[i], dim)
    if dummy_weight is None:
        dummy_weight = "encoder_use_attention" in config
    if dummy_weight:  # DPHuBERT's FeatureExtractor: features * dummy_weight
        extractor = model.feature_extractor
        extractor.dummy_weight = nn.Parameter(torch.ones(config["extractor_conv_layer_config"][-1][0]),
                                              requires_grad=False)
        extractor.register_forward_hook(lambda module, args, out: (out[0] * module.dummy_weight, out[1]))
    return model.eval()


def load_torchaudio_reference(path: str | os.PathLike) -> nn.Module:
    """:func:`torchaudio_reference` of a saved checkpoint, with its weights (strict: every key must fit)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = torchaudio_reference(ckpt["config"], dummy_weight="feature_extractor.dummy_weight" in ckpt["state_dict"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.eval()


def _randomize(model: nn.Module, generator: torch.Generator, scale_features: bool) -> None:
    """Non-trivial norms, biases, weight-norm gains (and feature scale), so parity tests see every tensor."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and module.weight is not None:
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
            if isinstance(module, nn.Conv1d) and module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
        conv = model.encoder.transformer.pos_conv_embed.conv
        gain = conv.parametrizations.weight.original0
        gain.copy_(gain * (1 + 0.2 * torch.rand(gain.shape, generator=generator)))
        if scale_features:
            weight = model.feature_extractor.dummy_weight
            weight.copy_(0.3 + 0.7 * torch.rand(weight.shape, generator=generator))


def make_torchaudio_checkpoint(path: str | os.PathLike, config: dict[str, Any] | None = None, *, seed: int = 0,
                               pos_conv: str = "parametrizations", scale_features: bool = False,
                               dummy_weight: bool | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a random model of ``config`` (default :func:`stock_config`) as ``{"state_dict", "config", **extra}``.

    ``pos_conv``: the positional conv's weight norm as torchaudio >= 2.2 stores it (``parametrizations``)
    or as torch's old hook did, which DPHuBERT's files hold (``weight_norm``: ``weight_g``/``weight_v``).
    ``scale_features``: a DPHuBERT config's ``dummy_weight`` gets values other than one (as after pruning).
    ``dummy_weight``: whether the file has one (default: a DPHuBERT config's has; its teacher files have none).
    """
    config = stock_config() if config is None else config
    torch.manual_seed(seed)
    model = torchaudio_reference(config, dummy_weight)
    _randomize(model, torch.Generator().manual_seed(seed + 1), scale_features and hasattr(model.feature_extractor,
                                                                                          "dummy_weight"))
    state = dict(model.state_dict())
    if pos_conv == "weight_norm":
        prefix = "encoder.transformer.pos_conv_embed.conv."
        state = {k.replace(prefix + "parametrizations.weight.original0", prefix + "weight_g")
                 .replace(prefix + "parametrizations.weight.original1", prefix + "weight_v"): v for k, v in state.items()}
    elif pos_conv != "parametrizations":
        raise ValueError(f"pos_conv must be parametrizations or weight_norm, not {pos_conv!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "config": config, **(extra or {})}, path)
    return path


# ------------------------------------------------------------------------------------------ WavLM
def wavlm_stock_config(*, layers: int = 3, dim: int = 45, heads: int = 5, ffn: int = 37, buckets: int = 10,
                       max_distance: int = 24, conv_pos: int = 15, conv_pos_groups: int = 5,
                       **options: Any) -> dict[str, Any]:
    """Keyword arguments of torchaudio's own ``wavlm_model``: odd sizes (heads of 9) and a few buckets, so
    distances beyond the exact range share logarithmic ones within a second of audio."""
    config = stock_config(layers=layers, dim=dim, heads=heads, ffn=ffn, conv_pos=conv_pos,
                          conv_pos_groups=conv_pos_groups, **options)
    config.update(encoder_num_buckets=buckets, encoder_max_distance=max_distance)
    return config


def load_torchaudio_wavlm(path: str | os.PathLike) -> nn.Module:
    """torchaudio's own ``wavlm_model`` of a saved stock file, with its weights (strict)."""
    from torchaudio.models import wavlm_model

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = wavlm_model(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.eval()


def make_torchaudio_wavlm_checkpoint(path: str | os.PathLike, config: dict[str, Any] | None = None, *,
                                     seed: int = 0) -> Path:
    """A random torchaudio ``wavlm_model`` of ``config`` (default :func:`wavlm_stock_config`) as
    ``{"state_dict", "config"}``: non-zero q/k/v/out biases, a random bias table and gate."""
    from torchaudio.models import wavlm_model

    config = wavlm_stock_config() if config is None else config
    torch.manual_seed(seed)
    model = wavlm_model(**config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    _randomize(model, generator, False)
    with torch.no_grad():
        for layer in model.encoder.transformer.layers:
            attention = layer.attention  # nn.MultiheadAttention starts its biases at zero: make them count
            for bias in (attention.attention.in_proj_bias, attention.attention.out_proj.bias):
                bias.copy_(0.2 * torch.randn(bias.shape, generator=generator))
            attention.gru_rel_pos_const.copy_(0.5 + torch.rand(attention.gru_rel_pos_const.shape, generator=generator))
            gate = attention.gru_rel_pos_linear
            gate.weight.copy_(0.5 * torch.randn(gate.weight.shape, generator=generator))
            gate.bias.copy_(0.5 * torch.randn(gate.bias.shape, generator=generator))
        table = model.encoder.transformer.layers[0].attention.rel_attn_embed.weight
        table.copy_(torch.randn(table.shape, generator=generator))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": dict(model.state_dict()), "config": config}, path)
    return path


def dpwavlm_config(stock: dict[str, Any], *, remaining_heads: list[list[int]] | None = None,
                   ffn: list[int] | None = None, use_attention: list[bool] | None = None,
                   use_feed_forward: list[bool] | None = None) -> dict[str, Any]:
    """DPHuBERT's ``wavlm_model`` keyword arguments (as its prune.py saves them) for ``stock`` pruned as given."""
    count, total = stock["encoder_num_layers"], stock["encoder_num_heads"]
    remaining = [list(r) for r in remaining_heads] if remaining_heads is not None else [list(range(total))] * count
    config = {k: v for k, v in stock.items() if k != "encoder_num_heads"}
    config.update(
        encoder_use_attention=list(use_attention) if use_attention is not None else [bool(r) for r in remaining],
        encoder_use_feed_forward=list(use_feed_forward or [True] * count),
        encoder_total_num_heads=[total] * count,
        encoder_remaining_heads=remaining,
        encoder_ff_interm_features=list(ffn or [stock["encoder_ff_interm_features"]] * count),
        normalize_waveform=False,
        extractor_prune_conv_channels=False, encoder_prune_attention_heads=False,
        encoder_prune_attention_layer=False, encoder_prune_feed_forward_intermediate=False,
        encoder_prune_feed_forward_layer=False,
    )
    return config


def make_dpwavlm_checkpoint(path: str | os.PathLike, stock_path: str | os.PathLike, *,
                            remaining_heads: list[list[int]] | None = None,
                            ffn_units: list[list[int] | None] | None = None,
                            use_attention: list[bool] | None = None,
                            use_feed_forward: list[bool] | None = None) -> Path:
    """The stock WavLM file ``stock_path`` pruned as DPHuBERT's ``prune()`` leaves it, saved as DPWavLM.

    ``remaining_heads``: each layer's kept original heads (default all; [] removes the sublayer, as
    DPHuBERT does when no head survives). ``ffn_units``: each layer's kept FFN units (None: all).
    ``use_attention`` / ``use_feed_forward``: False removes the sublayer's tensors whatever is kept.
    The positional conv is stored as torch's old weight-norm hook did and ``dummy_weight`` is ones
    (conv channels unpruned), as in DPHuBERT's files.
    """
    ckpt = torch.load(stock_path, map_location="cpu", weights_only=True)
    stock, state = ckpt["config"], dict(ckpt["state_dict"])
    count, total, dim = stock["encoder_num_layers"], stock["encoder_num_heads"], stock["encoder_embed_dim"]
    head_dim = dim // total
    ffn_units = ffn_units or [None] * count
    ffn = [stock["encoder_ff_interm_features"] if units is None else len(units) for units in ffn_units]
    config = dpwavlm_config(stock, remaining_heads=remaining_heads, ffn=ffn, use_attention=use_attention,
                            use_feed_forward=use_feed_forward)
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if not key.startswith("encoder.transformer.layers."):
            out[key.replace("conv.parametrizations.weight.original0", "conv.weight_g")
                .replace("conv.parametrizations.weight.original1", "conv.weight_v")] = tensor
    for i in range(count):
        src = f"encoder.transformer.layers.{i}"
        for name in ("layer_norm", "final_layer_norm"):
            for p in ("weight", "bias"):
                out[f"{src}.{name}.{p}"] = state[f"{src}.{name}.{p}"]
        if config["encoder_use_attention"][i]:
            heads = config["encoder_remaining_heads"][i]
            index = torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)
            for p in ("weight", "bias"):  # DPHuBERT's prune_linear_layer: kept output rows of q/k/v
                for proj, part in zip(("q_proj", "k_proj", "v_proj"),
                                      state[f"{src}.attention.attention.in_proj_{p}"].chunk(3, dim=0)):
                    out[f"{src}.attention.{proj}.{p}"] = part[index].clone()
            out[f"{src}.attention.out_proj.weight"] = state[f"{src}.attention.attention.out_proj.weight"][:, index].clone()
            out[f"{src}.attention.out_proj.bias"] = state[f"{src}.attention.attention.out_proj.bias"]
            for p in ("weight", "bias"):  # the gate acts on every original head's chunk: unchanged
                out[f"{src}.attention.gru_rel_pos_linear.{p}"] = state[f"{src}.attention.gru_rel_pos_linear.{p}"]
            out[f"{src}.attention.gru_rel_pos_const"] = state[f"{src}.attention.gru_rel_pos_const"]  # full width
            if i == 0:
                out[f"{src}.attention.rel_attn_embed.weight"] = state[f"{src}.attention.rel_attn_embed.weight"]
        if config["encoder_use_feed_forward"][i]:
            units = ffn_units[i]
            keep = torch.arange(stock["encoder_ff_interm_features"]) if units is None else torch.tensor(units)
            dense = f"{src}.feed_forward"
            out[f"{dense}.intermediate_dense.weight"] = state[f"{dense}.intermediate_dense.weight"][keep].clone()
            out[f"{dense}.intermediate_dense.bias"] = state[f"{dense}.intermediate_dense.bias"][keep].clone()
            out[f"{dense}.output_dense.weight"] = state[f"{dense}.output_dense.weight"][:, keep].clone()
            out[f"{dense}.output_dense.bias"] = state[f"{dense}.output_dense.bias"]
    out["feature_extractor.dummy_weight"] = torch.ones(config["extractor_conv_layer_config"][-1][0])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": out, "config": config}, path)
    return path
