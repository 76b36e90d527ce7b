"""torchaudio wav2vec2-layout checkpoints (DPHuBERT's) <-> (ModelConfig, state_dict) of :class:`SpeechTransformer`.

The file is ``{"state_dict": ..., "config": {...}}`` (plus, from DPHuBERT's ``save_final_ckpt.py``,
``distill_linear_projs``), where ``config`` holds the keyword arguments of a ``wav2vec2_model``:

- torchaudio's own (``torchaudio.models.wav2vec2_model``): uniform ints ``encoder_num_heads`` and
  ``encoder_ff_interm_features``, head size ``encoder_embed_dim / encoder_num_heads``;
- DPHuBERT's (``wav2vec2/model.py`` of pyf98/DPHuBERT): per-layer lists ``encoder_num_heads``,
  ``encoder_ff_interm_features``, ``encoder_use_attention``, ``encoder_use_feed_forward``, the head
  size ``encoder_head_dim`` (the unpruned model's, kept when heads are pruned), ``normalize_waveform``,
  a possibly pruned ``extractor_conv_layer_config``, and a ``feature_extractor.dummy_weight``: a
  per-channel scale of the last conv layer's output (the soft mask that pruning left; ones otherwise).

Key names, torchaudio -> ours:

=====================================================================  =================================
``feature_extractor.conv_layers.{i}.conv.{weight,bias}``               ``feature_extractor.convs.{i}.*``
``feature_extractor.conv_layers.{i}.layer_norm.*`` (GroupNorm / LN)    ``feature_extractor.norms.{i}.*``
``feature_extractor.dummy_weight`` (DPHuBERT)                          ``feature_scale`` (if not all ones)
``encoder.feature_projection.layer_norm.*``                            ``feature_norm.*``
``encoder.feature_projection.projection.*``                            ``feature_projection.*``
``encoder.transformer.pos_conv_embed.conv.weight_g / weight_v``        ``positional_conv.weight_g / weight_v``
  (or ``...conv.parametrizations.weight.original0 / original1``)
``encoder.transformer.pos_conv_embed.conv.bias``                       ``positional_conv.bias``
``encoder.transformer.layer_norm.*``                                   ``encoder_norm.*``
``encoder.transformer.layers.{i}.attention.{q,k,v,out}_proj.*``        ``layers.{i}.attention.*``
``encoder.transformer.layers.{i}.layer_norm.*``                        ``layers.{i}.attention_norm.*``
``encoder.transformer.layers.{i}.feed_forward.intermediate_dense.*``   ``layers.{i}.feed_forward.fc1.*``
``encoder.transformer.layers.{i}.feed_forward.output_dense.*``         ``layers.{i}.feed_forward.fc2.*``
``encoder.transformer.layers.{i}.final_layer_norm.*``                  ``layers.{i}.final_norm.*``
=====================================================================  =================================

WavLM in this layout (``encoder_num_buckets`` / ``encoder_max_distance`` in the config):

- torchaudio's own (``torchaudio.models.wavlm_model``): uniform ints; each layer's attention is an
  ``nn.MultiheadAttention`` (``attention.attention.in_proj_weight``, q, k, v stacked, and
  ``attention.attention.out_proj``), split into our q/k/v on reading and stacked again on writing;
- DPHuBERT's (DPWavLM, its ``wavlm_model``): per-layer lists ``encoder_total_num_heads`` (the unpruned
  count, which sizes a head), ``encoder_remaining_heads`` (the original indices of the heads kept, [] for
  none), ``encoder_use_*``, ``encoder_ff_interm_features``; separate ``attention.{q,k,v,out}_proj``.

Both hold the shared bias in layer 0's attention and gate it in every layer (``gru_rel_pos``, always on):

=====================================================================  =================================
``encoder.transformer.layers.0.attention.rel_attn_embed.weight``       ``relative_position_bias.weight``
``encoder.transformer.layers.{i}.attention.gru_rel_pos_linear.*``      ``layers.{i}.attention.gate.*``
``encoder.transformer.layers.{i}.attention.gru_rel_pos_const``         ``layers.{i}.attention.gate_scale``
  (1, original heads, 1, 1): DPHuBERT keeps every original head's        (kept heads,): the entries of
                                                                         ``head_ids`` (= remaining heads)
=====================================================================  =================================

The pruned heads' gate constants stay in ``extras`` so the full-width tensor comes back on writing.

A fine-tuning head (``aux.*``) and DPHuBERT's ``distill_linear_projs`` are kept aside, so writing
back (:func:`write`) gives the same file. Hidden states follow DPHuBERT's ``extract_features``
(kind ``torchaudio``): the projected features (padded frames zeroed), then every layer's output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..config import TORCHAUDIO, LayerConfig, ModelConfig
from .common import Converted

NAME = "torchaudio_wav2vec2"
DPHUBERT, STOCK = "dphubert", "torchaudio"  # the two flavours of the config (see the module docstring)
HUBERT_BASE_CONV = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
# Where the positional conv's weight norm lives: torch's old hook or its parametrizations (torchaudio >= 2.2).
POS_CONV = "encoder.transformer.pos_conv_embed.conv"
WEIGHT_NORM_KEYS = {"weight_norm": ("weight_g", "weight_v"),
                    "parametrizations": ("parametrizations.weight.original0", "parametrizations.weight.original1")}
DUMMY_WEIGHT = "feature_extractor.dummy_weight"
PRUNE_FLAGS = ("extractor_prune_conv_channels", "encoder_prune_attention_heads", "encoder_prune_attention_layer",
               "encoder_prune_feed_forward_intermediate", "encoder_prune_feed_forward_layer")
DPHUBERT_ONLY = ("encoder_use_attention", "encoder_use_feed_forward", "encoder_head_dim", "normalize_waveform",
                 *PRUNE_FLAGS)
# WavLM in this layout: the config keys that mark it, and where its tensors live.
WAVLM_ONLY = ("encoder_num_buckets", "encoder_max_distance", "encoder_total_num_heads", "encoder_remaining_heads")
LAYERS = "encoder.transformer.layers"
BIAS_KEY = f"{LAYERS}.0.attention.rel_attn_embed.weight"
IN_PROJ, STOCK_OUT_PROJ = "attention.attention.in_proj_", "attention.attention.out_proj."  # torchaudio's own WavLM


def matches(ckpt: dict[str, Any]) -> bool:
    config = ckpt.get("config")
    return isinstance(ckpt.get("state_dict"), dict) and isinstance(config, dict) and "encoder_embed_dim" in config


def _per_layer(value: Any, count: int, name: str, kind: type) -> list:
    """An int/bool for every layer, or a per-layer list of them (DPHuBERT) -> a list of ``count``."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(f"config {name} has {len(values)} entries for {count} layers (encoder_num_layers)")
    return [kind(v) for v in values]


def _conv_layers(value: Any) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in layer) for layer in (HUBERT_BASE_CONV if value is None else value)]


def _renames(layer_count: int, conv_count: int, extractor_mode: str, pos_conv: str,
             wavlm: bool = False) -> dict[str, str]:
    """torchaudio key -> our key (see the tables in the module docstring; WavLM's q/k/v in DPHuBERT's form,
    its gate constants reshaped apart)."""
    names: dict[str, str] = {}
    for i in range(conv_count):
        for p in ("weight", "bias"):
            names[f"feature_extractor.conv_layers.{i}.conv.{p}"] = f"feature_extractor.convs.{i}.{p}"
            if extractor_mode == "layer_norm" or i == 0:
                names[f"feature_extractor.conv_layers.{i}.layer_norm.{p}"] = f"feature_extractor.norms.{i}.{p}"
    for p in ("weight", "bias"):
        names[f"encoder.feature_projection.layer_norm.{p}"] = f"feature_norm.{p}"
        names[f"encoder.feature_projection.projection.{p}"] = f"feature_projection.{p}"
        names[f"encoder.transformer.layer_norm.{p}"] = f"encoder_norm.{p}"
    g, v = WEIGHT_NORM_KEYS[pos_conv]
    names[f"{POS_CONV}.{g}"], names[f"{POS_CONV}.{v}"] = "positional_conv.weight_g", "positional_conv.weight_v"
    names[f"{POS_CONV}.bias"] = "positional_conv.bias"
    for i in range(layer_count):
        src, dst = f"encoder.transformer.layers.{i}", f"layers.{i}"
        for p in ("weight", "bias"):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                names[f"{src}.attention.{proj}.{p}"] = f"{dst}.attention.{proj}.{p}"
            names[f"{src}.layer_norm.{p}"] = f"{dst}.attention_norm.{p}"
            names[f"{src}.feed_forward.intermediate_dense.{p}"] = f"{dst}.feed_forward.fc1.{p}"
            names[f"{src}.feed_forward.output_dense.{p}"] = f"{dst}.feed_forward.fc2.{p}"
            names[f"{src}.final_layer_norm.{p}"] = f"{dst}.final_norm.{p}"
            if wavlm:
                names[f"{src}.attention.gru_rel_pos_linear.{p}"] = f"{dst}.attention.gate.{p}"
    if wavlm:
        names[BIAS_KEY] = "relative_position_bias.weight"
    return names


def _pos_conv_form(state: dict[str, Tensor]) -> str:
    for form, (g, _) in WEIGHT_NORM_KEYS.items():
        if f"{POS_CONV}.{g}" in state:
            return form
    raise ValueError(f"no weight-normalised positional conv ({POS_CONV}.weight_g or its parametrizations) in the state dict")


def _is_wavlm(cfg: dict[str, Any], state: dict[str, Tensor]) -> bool:
    return any(k in cfg for k in WAVLM_ONLY) or any(".rel_attn_embed." in k or ".gru_rel_pos" in k for k in state)


def _check_supported(cfg: dict[str, Any], state: dict[str, Tensor]) -> None:
    gated = [flag for flag in PRUNE_FLAGS if cfg.get(flag)] or [k for k in state if "hard_concrete" in k][:1]
    if gated:
        raise ValueError(f"the model still carries DPHuBERT's hard-concrete pruning gates ({gated[0]}); run DPHuBERT's "
                         "prune.py (and its final distillation and save_final_ckpt.py) first, which removes them")
    if cfg.get("extractor_mode", "group_norm") not in ("group_norm", "layer_norm"):
        raise ValueError(f"unknown extractor_mode {cfg['extractor_mode']!r}; torchaudio knows group_norm and layer_norm")


def _split_in_proj(state: dict[str, Tensor], count: int) -> None:
    """torchaudio's own WavLM (``nn.MultiheadAttention``) -> DPHuBERT's separate q/k/v/out keys, in place.

    Writing stacks them again for the stock flavour, the only one whose class has that form."""
    for i in range(count):
        src = f"{LAYERS}.{i}."
        for p in ("weight", "bias"):
            packed = state.pop(f"{src}{IN_PROJ}{p}", None)
            if packed is not None:  # q, k, v stacked in that order (torchaudio's forward chunks it so)
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), packed.chunk(3, dim=0)):
                    state[f"{src}attention.{proj}.{p}"] = part.clone()
            out = state.pop(f"{src}{STOCK_OUT_PROJ}{p}", None)
            if out is not None:
                state[f"{src}attention.out_proj.{p}"] = out


def _wavlm_heads(cfg: dict[str, Any], count: int, dim: int,
                 use_attention: list[bool]) -> tuple[int, int, list[list[int]]]:
    """(original heads, head size, each layer's kept original heads) of a WavLM config, either flavour."""
    for key in ("encoder_num_buckets", "encoder_max_distance"):
        if key not in cfg:
            raise ValueError(f"a WavLM-layout checkpoint (relative position bias, encoder_remaining_heads) needs "
                             f"{key} in its config")
    totals = _per_layer(cfg.get("encoder_total_num_heads", cfg.get("encoder_num_heads")), count,
                        "encoder_total_num_heads", int)
    # One bias column per original head, shared by all layers: DPHuBERT builds every layer with the same total.
    if len(set(totals)) != 1 or totals[0] <= 0 or dim % totals[0]:
        raise ValueError(f"WavLM's encoder_total_num_heads {totals} must be one positive count dividing "
                         f"encoder_embed_dim {dim} (the shared bias has a column per original head)")
    total = totals[0]
    remaining = cfg.get("encoder_remaining_heads")
    if remaining is None:  # torchaudio's own: every head
        remaining = [list(range(total))] * count
    if len(remaining) != count:
        raise ValueError(f"config encoder_remaining_heads has {len(remaining)} entries for {count} layers")
    kept = []
    for i, heads in enumerate(remaining):
        heads = [int(h) for h in heads] if use_attention[i] else []  # a removed sublayer: the flag wins
        if len(set(heads)) != len(heads) or any(not 0 <= h < total for h in heads):
            raise ValueError(f"layer {i}: encoder_remaining_heads {heads} are not distinct heads below {total}")
        kept.append(heads)
    return total, dim // total, kept


def _take_gate_consts(state: dict[str, Tensor], count: int, total: int,
                      use_attention: list[bool]) -> dict[int, Tensor]:
    """Every attention layer's full-width ``gru_rel_pos_const`` (popped from ``state``), checked."""
    consts = {}
    for i in range(count):
        src = f"{LAYERS}.{i}.attention"
        const = state.pop(f"{src}.gru_rel_pos_const", None)
        if not use_attention[i]:
            if const is not None:
                raise ValueError(f"layer {i}: the config removes the attention sublayer, but {src}.gru_rel_pos_const "
                                 "is there")
            continue
        # torchaudio's and DPHuBERT's WavLM always gate the bias (gru_rel_pos): strict loaders need the tensors.
        if const is None or f"{src}.gru_rel_pos_linear.weight" not in state:
            raise ValueError(f"layer {i}: {src}.gru_rel_pos_const / gru_rel_pos_linear missing; torchaudio's and "
                             "DPHuBERT's WavLM gate the relative position bias in every attention layer")
        if tuple(const.shape) != (1, total, 1, 1):
            raise ValueError(f"layer {i}: {src}.gru_rel_pos_const has shape {tuple(const.shape)}, expected "
                             f"(1, {total}, 1, 1): one per original head, pruned or not")
        consts[i] = const
    return consts


def read(ckpt: dict[str, Any]) -> Converted:
    """A ``{"state_dict", "config"}`` torchaudio/DPHuBERT checkpoint in our terms."""
    cfg, state = dict(ckpt["config"]), dict(ckpt["state_dict"])
    _check_supported(cfg, state)
    count, dim = int(cfg["encoder_num_layers"]), int(cfg["encoder_embed_dim"])
    use_attention = _per_layer(cfg.get("encoder_use_attention", True), count, "encoder_use_attention", bool)
    use_ffn = _per_layer(cfg.get("encoder_use_feed_forward", True), count, "encoder_use_feed_forward", bool)
    ffn = _per_layer(cfg["encoder_ff_interm_features"], count, "encoder_ff_interm_features", int)
    wavlm = _is_wavlm(cfg, state)
    head_ids: list[list[int] | None] = [None] * count
    if wavlm:
        total, head_dim, kept = _wavlm_heads(cfg, count, dim, use_attention)
        heads = [len(k) for k in kept]
        # Only a subset or reordering needs recording; the first n heads in order are the default.
        head_ids = [k if k != list(range(len(k))) else None for k in kept]
    else:
        heads = _per_layer(cfg["encoder_num_heads"], count, "encoder_num_heads", int)
        if "encoder_head_dim" in cfg:
            head_dim = int(cfg["encoder_head_dim"])
        elif isinstance(cfg["encoder_num_heads"], int) and cfg["encoder_num_heads"] > 0 \
                and dim % cfg["encoder_num_heads"] == 0:
            head_dim = dim // cfg["encoder_num_heads"]  # torchaudio's own SelfAttention: embed_dim / num_heads
        else:
            raise ValueError(f"cannot tell the head size: encoder_embed_dim {dim} with encoder_num_heads "
                             f"{cfg['encoder_num_heads']!r} and no encoder_head_dim")
    layers = []
    for i in range(count):  # DPHuBERT may leave a count beside a removed sublayer: the flag wins
        layers.append(LayerConfig(num_heads=heads[i] if use_attention[i] else 0, ffn_dim=ffn[i] if use_ffn[i] else 0,
                                  attention=use_attention[i], ffn=use_ffn[i],
                                  head_ids=head_ids[i] if use_attention[i] else None))
    mode = str(cfg.get("extractor_mode", "group_norm"))
    conv_layers = _conv_layers(cfg.get("extractor_conv_layer_config"))
    form = _pos_conv_form(state)
    wavlm_extras: dict[str, Any] = {}
    if wavlm:
        if BIAS_KEY not in state:
            # DPHuBERT builds the bias in layer 0's attention only: removing that sublayer drops it for every
            # layer (and its forward then fails on a padded batch), so there is no model to match.
            if use_attention[0]:
                raise ValueError(f"WavLM's relative position bias lives in {BIAS_KEY}, which is missing")
            raise ValueError(f"WavLM's relative position bias lives in {BIAS_KEY} and encoder_use_attention[0] is "
                             "false: a DPWavLM whose layer 0 attention was removed has no position bias at all "
                             "(DPHuBERT's forward then fails on padded batches); not supported")
        _split_in_proj(state, count)
        wavlm_extras = {"gate_consts": _take_gate_consts(state, count, total, use_attention)}
    names = _renames(count, len(conv_layers), mode, form, wavlm)
    ours, rest = {}, {}
    for key, tensor in state.items():
        (ours if key in names else rest)[names.get(key, key)] = tensor
    for i, const in wavlm_extras.get("gate_consts", {}).items():
        ids = layers[i].head_ids if layers[i].head_ids is not None else range(layers[i].num_heads)
        ours[f"layers.{i}.attention.gate_scale"] = const.reshape(-1)[list(ids)].clone()  # the kept heads' entries
    dummy = rest.pop(DUMMY_WEIGHT, None)
    # A scale of ones changes nothing: the model then has none, and writing back restores the ones.
    scaled = dummy is not None and not bool((dummy == 1).all())
    if scaled:
        ours["feature_scale"] = dummy
    aux = {k: rest.pop(k) for k in [k for k in rest if k.startswith("aux.")]}
    if rest:
        raise ValueError(f"unexpected tensors {sorted(rest)[:5]} (not in the layout of a torchaudio "
                         f"{'wavlm' if wavlm else 'wav2vec2'}_model with this config)")
    _check_shapes(ours, layers, head_dim, conv_layers)
    dphubert = dummy is not None or any(k in cfg for k in (*DPHUBERT_ONLY, "encoder_remaining_heads",
                                                           "encoder_total_num_heads"))
    config = ModelConfig(
        kind=TORCHAUDIO,
        embed_dim=dim,
        head_dim=head_dim,
        layers=layers,
        conv_layers=conv_layers,
        extractor_mode="default" if mode == "group_norm" else "layer_norm",
        conv_bias=bool(cfg.get("extractor_conv_bias", False)),
        conv_pos=int(cfg.get("encoder_pos_conv_kernel", 128)),
        conv_pos_groups=int(cfg.get("encoder_pos_conv_groups", 16)),
        layer_norm_first=bool(cfg.get("encoder_layer_norm_first", False)),
        feature_layer_norm=True,  # torchaudio's FeatureProjection: LayerNorm, then the Linear
        normalize_waveform=bool(cfg.get("normalize_waveform", False)),
        dropout=float(cfg.get("encoder_dropout", 0.0)),
        attention_dropout=float(cfg.get("encoder_attention_dropout", 0.0)),
        activation_dropout=float(cfg.get("encoder_ff_interm_dropout", 0.0)),
        feature_projection=True,  # torchaudio always projects, even when the widths agree
        feature_scale=scaled,
        relative_position_buckets=int(cfg["encoder_num_buckets"]) if wavlm else 0,
        max_relative_distance=int(cfg["encoder_max_distance"]) if wavlm else 800,
        gated_relative_position=wavlm,
    )
    others = {k: v for k, v in ckpt.items() if k not in ("state_dict", "config")}
    extras = {"config": cfg, "flavour": DPHUBERT if dphubert else STOCK, "pos_conv": form,
              "dummy_weight": dummy is not None, "pretraining_weights": aux, "others": others}
    if wavlm:
        extras["wavlm"] = wavlm_extras
    return Converted(config, ours, NAME, extras)


def _check_shapes(state: dict[str, Tensor], layers: list[LayerConfig], head_dim: int,
                  conv_layers: list[tuple[int, int, int]]) -> None:
    """The config's sizes against the tensors, so a mismatch names the layer instead of failing later."""
    for i, layer in enumerate(layers):
        for present, key, rows, what in (
            (layer.attention, f"layers.{i}.attention.q_proj.weight", layer.num_heads * head_dim,
             f"{layer.num_heads} heads of {head_dim}"),
            (layer.ffn, f"layers.{i}.feed_forward.fc1.weight", layer.ffn_dim, f"{layer.ffn_dim} FFN units"),
        ):
            if present and key not in state:
                raise ValueError(f"layer {i}: the config says it has {what}, but {key} is missing")
            if not present and key in state:
                raise ValueError(f"layer {i}: the config removes this sublayer (encoder_use_* false), but {key} is there")
            if present and state[key].shape[0] != rows:
                raise ValueError(f"layer {i}: the config says {what} ({rows} rows), but {key} has {state[key].shape[0]}")
    for i, (channels, kernel, _) in enumerate(conv_layers):
        weight = state.get(f"feature_extractor.convs.{i}.weight")
        if weight is None or tuple(weight.shape[::2]) != (channels, kernel):
            found = None if weight is None else tuple(weight.shape)
            raise ValueError(f"conv layer {i}: extractor_conv_layer_config says {channels} channels of kernel {kernel}, "
                             f"the state dict has {found}")


def _uniform_stock(config: ModelConfig) -> bool:
    """Whether torchaudio's own wav2vec2_model (uniform ints, head size embed/heads, no scale) can hold it."""
    first = config.layers[0]
    return (all(layer == first for layer in config.layers) and first.attention and first.ffn
            and first.num_heads * config.head_dim == config.embed_dim and not config.feature_scale
            and not config.normalize_waveform)


def _keep_if_equal(raw: dict[str, Any], key: str, value: Any, normalise=lambda v: v) -> None:
    """Set ``raw[key]``, keeping the original object when it means the same (so a round trip is exact)."""
    if key in raw and normalise(raw[key]) == value:
        return
    raw[key] = value


def _check_wavlm_writable(config: ModelConfig) -> None:
    """Refuse, saying why, a biased model that torchaudio's and DPHuBERT's WavLM cannot build."""
    if not config.gated_relative_position:
        raise ValueError("torchaudio's and DPHuBERT's WavLM always gate the relative position bias (gru_rel_pos); "
                         "a model without the gate has no place in this layout")
    if not config.layers[0].attention:
        raise ValueError("torchaudio's and DPHuBERT's WavLM hold the shared relative position bias in layer 0's "
                         "attention: with that sublayer removed the file would lose the bias for every layer")


def _trivial_ids(layer: LayerConfig) -> bool:
    return layer.head_ids is None or layer.head_ids == list(range(layer.num_heads))


def _gate_consts(config: ModelConfig, state: dict[str, Tensor], extras: dict[str, Any]) -> dict[str, Tensor]:
    """Each attention layer's full-width ``gru_rel_pos_const``: the kept heads' entries from ``gate_scale``,
    the pruned heads' from the file read (ones for a model that never had them)."""
    total, originals = config.relative_position_heads, extras.get("wavlm", {}).get("gate_consts", {})
    consts = {}
    for i, layer in enumerate(config.layers):
        if not layer.attention:
            continue
        scale = state[f"layers.{i}.attention.gate_scale"]
        old = originals.get(i)
        full = old.clone() if old is not None and tuple(old.shape) == (1, total, 1, 1) else scale.new_ones(1, total, 1, 1)
        ids = layer.head_ids if layer.head_ids is not None else list(range(layer.num_heads))
        full.view(-1)[torch.tensor(ids, dtype=torch.long)] = scale.detach().to(full.dtype)
        consts[f"{LAYERS}.{i}.attention.gru_rel_pos_const"] = full
    return consts


def _stack_in_proj(weights: dict[str, Tensor], count: int) -> None:
    """DPHuBERT's separate q/k/v/out keys -> torchaudio's own ``nn.MultiheadAttention`` ones, in place."""
    for i in range(count):
        src = f"{LAYERS}.{i}."
        for p in ("weight", "bias"):
            parts = [weights.pop(f"{src}attention.{proj}.{p}") for proj in ("q_proj", "k_proj", "v_proj")]
            weights[f"{src}{IN_PROJ}{p}"] = torch.cat(parts, dim=0)
            weights[f"{src}{STOCK_OUT_PROJ}{p}"] = weights.pop(f"{src}attention.out_proj.{p}")


def _old_per_layer(raw: dict[str, Any], key: str, count: int, default: Any) -> list:
    """The file's per-layer value of ``key``, or ``default`` for each layer when it has none for this many."""
    value = raw.get(key, default)
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    return values if len(values) == count else [default] * count


def write(converted: Converted) -> dict[str, Any]:
    """The inverse of :func:`read`: ``{"state_dict", "config", ...}`` that ``torch.save`` writes.

    torchaudio's own keyword arguments when the structure allows them (uniform, and the base was
    such a file), else DPHuBERT's per-layer ones. Weight-pruning masks are left out (the weights are
    zero there); low-rank factors have no place in the layout.
    """
    config, state, extras = converted.config, converted.state_dict, converted.extras
    if config.kind != TORCHAUDIO:
        raise ValueError(f"a {config.kind} model has another hidden-state layout; only torchaudio-kind models "
                         "(read from a torchaudio/DPHuBERT checkpoint) are written in this layout")
    if any(layer.ranks for layer in config.layers):
        raise ValueError("torchaudio's wav2vec2 layout has no low-rank Linears; load this model as a delta upstream")
    if config.frontend != "conv" or not config.has_feature_projection or not config.feature_layer_norm:
        raise ValueError("torchaudio's wav2vec2 layout needs a conv front end, its LayerNorm and the feature projection")
    wavlm = config.relative_position_buckets > 0
    if wavlm:
        _check_wavlm_writable(config)
    state = {k: v for k, v in state.items() if not k.endswith(".mask")}
    # torchaudio's own wavlm_model ties head h to bias column h: kept heads other than the first n need DPHuBERT's.
    stock = _uniform_stock(config) and (not wavlm or all(_trivial_ids(layer) for layer in config.layers))
    flavour = STOCK if extras.get("flavour", STOCK) == STOCK and stock else DPHUBERT
    form = extras.get("pos_conv") or ("parametrizations" if flavour == STOCK else "weight_norm")
    mode = "group_norm" if config.extractor_mode == "default" else "layer_norm"
    back = {ours: theirs for theirs, ours in _renames(config.num_layers, len(config.conv_layers), mode, form,
                                                      wavlm).items()}
    weights = _gate_consts(config, state, extras) if wavlm else {}
    for key, tensor in state.items():
        if key == "feature_scale":
            weights[DUMMY_WEIGHT] = tensor
        elif wavlm and key.endswith(".attention.gate_scale"):
            continue  # in the full-width constants above
        elif key not in back:
            raise ValueError(f"tensor {key} has no place in torchaudio's wav2vec2 layout")
        else:
            weights[back[key]] = tensor
    # DPHuBERT's FeatureExtractor always has it (its pruned-model loader is strict); its teacher files,
    # converted from torchaudio's own models, lack it: a file that had none gets none back.
    had_none = extras.get("flavour") == DPHUBERT and not extras.get("dummy_weight", True)
    if flavour == DPHUBERT and DUMMY_WEIGHT not in weights and not had_none:
        weights[DUMMY_WEIGHT] = state["feature_norm.weight"].new_ones(config.conv_dim)
    weights.update(extras.get("pretraining_weights", {}))
    if wavlm and flavour == STOCK:
        _stack_in_proj(weights, config.num_layers)

    raw = dict(extras.get("config", {}))
    raw.setdefault("aux_num_out", None)
    _keep_if_equal(raw, "extractor_mode", mode)
    _keep_if_equal(raw, "extractor_conv_layer_config", [tuple(layer) for layer in config.conv_layers], _conv_layers)
    for key, value in (
        ("extractor_conv_bias", config.conv_bias), ("encoder_embed_dim", config.embed_dim),
        ("encoder_pos_conv_kernel", config.conv_pos), ("encoder_pos_conv_groups", config.conv_pos_groups),
        ("encoder_num_layers", config.num_layers), ("encoder_layer_norm_first", config.layer_norm_first),
        ("encoder_dropout", config.dropout), ("encoder_attention_dropout", config.attention_dropout),
        ("encoder_ff_interm_dropout", config.activation_dropout),
    ):
        _keep_if_equal(raw, key, value)
    for key, default in (("encoder_projection_dropout", 0.0), ("encoder_layer_drop", 0.0)):
        raw.setdefault(key, default)
    if wavlm:
        _keep_if_equal(raw, "encoder_num_buckets", config.relative_position_buckets)
        _keep_if_equal(raw, "encoder_max_distance", config.max_relative_distance)
    if flavour == STOCK:
        _keep_if_equal(raw, "encoder_num_heads", config.layers[0].num_heads)
        _keep_if_equal(raw, "encoder_ff_interm_features", config.layers[0].ffn_dim)
        return {"state_dict": weights, "config": raw, **extras.get("others", {})}

    if wavlm:
        return {"state_dict": weights, "config": _dpwavlm_config(config, raw), **extras.get("others", {})}
    count = config.num_layers
    old_heads = _per_layer(raw.get("encoder_num_heads", 0), count, "encoder_num_heads", int)
    old_ffn = _per_layer(raw.get("encoder_ff_interm_features", 0), count, "encoder_ff_interm_features", int)
    # A removed sublayer keeps the count its file had (DPHuBERT may leave one there); it means nothing.
    heads = [layer.num_heads if layer.attention else old for layer, old in zip(config.layers, old_heads)]
    ffn = [layer.ffn_dim if layer.ffn else old for layer, old in zip(config.layers, old_ffn)]
    for key, value in (
        ("encoder_num_heads", heads), ("encoder_ff_interm_features", ffn), ("encoder_head_dim", config.head_dim),
        ("encoder_use_attention", [layer.attention for layer in config.layers]),
        ("encoder_use_feed_forward", [layer.ffn for layer in config.layers]),
        ("normalize_waveform", config.normalize_waveform),
    ):
        _keep_if_equal(raw, key, value)
    for flag in PRUNE_FLAGS:
        raw.setdefault(flag, False)
    return {"state_dict": weights, "config": raw, **extras.get("others", {})}



def _dpwavlm_config(config: ModelConfig, raw: dict[str, Any]) -> dict[str, Any]:
    """DPHuBERT's ``wavlm_model`` keyword arguments (per-layer lists) for ``config``, on top of the file's ``raw``."""
    count = config.num_layers
    # DPHuBERT's wavlm_model takes neither (a head's size is embed_dim / total heads): from a stock file, drop them.
    for key in ("encoder_num_heads", "encoder_head_dim"):
        raw.pop(key, None)
    old_use = _old_per_layer(raw, "encoder_use_attention", count, True)
    old_remaining = _old_per_layer(raw, "encoder_remaining_heads", count, [])
    old_ffn = _old_per_layer(raw, "encoder_ff_interm_features", count, 0)
    remaining, ffn = [], []
    for i, layer in enumerate(config.layers):
        if layer.attention:
            remaining.append(layer.head_ids if layer.head_ids is not None else list(range(layer.num_heads)))
        else:  # a sublayer removed in the file keeps the list it had there; one removed since gets none
            remaining.append(old_remaining[i] if not old_use[i] else [])
        ffn.append(layer.ffn_dim if layer.ffn else old_ffn[i])
    for key, value in (
        ("encoder_total_num_heads", [config.relative_position_heads] * count), ("encoder_remaining_heads", remaining),
        ("encoder_ff_interm_features", ffn), ("encoder_use_attention", [layer.attention for layer in config.layers]),
        ("encoder_use_feed_forward", [layer.ffn for layer in config.layers]),
        ("normalize_waveform", config.normalize_waveform),
    ):
        _keep_if_equal(raw, key, value)
    for flag in PRUNE_FLAGS:
        raw.setdefault(flag, False)
    return raw
