"""SpeechTransformer: the one model class for base and compressed HuBERT / DistilHuBERT / WavLM models."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FBANK, HUBERT, TORCHAUDIO, LayerConfig, ModelConfig
from .fbank import FbankFrontEnd
from .layers import (
    ConvFeatureExtractor,
    EncoderLayer,
    LowRankLinear,
    PositionalConv,
    PredictionHeads,
    RelativePositionBias,
    select_columns,
    select_norm,
)
from .sparse import MaskedLinear, set_execution

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _drop_linear_options(config: LayerConfig, names: Sequence[str]) -> None:
    """Forget ranks / masks of Linears that no longer exist."""
    for name in names:
        config.ranks.pop(name, None)
        if name in config.sparse:
            config.sparse.remove(name)


class SpeechTransformer(nn.Module):
    """Waveforms -> list of hidden states, laid out exactly like S3PRL's upstream for ``config.kind``.

    ``hubert``: [encoder input] + outputs of layers 1..L-1 + encoder output (L+1 states).
    ``distiller``, ``melhubert`` and ``torchaudio`` (DPHuBERT's): [projected features] + outputs of layers 1..L
    + prediction heads (if any).
    The front end is HuBERT's convolutions or MelHuBERT's fbank (``config.frontend``).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = copy.deepcopy(config)  # structural changes edit it; never alias the caller's
        c = self.config
        self.feature_extractor = (
            FbankFrontEnd(c.fbank_mel_bins, c.fbank_stack)
            if c.frontend == FBANK
            else ConvFeatureExtractor(c.conv_layers, c.extractor_mode, c.conv_bias)
        )
        self.feature_norm = nn.LayerNorm(c.conv_dim) if c.feature_layer_norm else None
        # DPHuBERT's fixed per-channel scale (a buffer: it trains it no more than DPHuBERT does).
        self.register_buffer("feature_scale", torch.ones(c.conv_dim) if c.feature_scale else None)
        self.feature_projection = nn.Linear(c.conv_dim, c.embed_dim) if c.has_feature_projection else None
        self.positional_conv = PositionalConv(c.embed_dim, c.conv_pos, c.conv_pos_groups)
        # WavLM's: held once for all layers and as wide as the unpruned model's heads, whatever each layer keeps.
        self.relative_position_bias = (
            RelativePositionBias(c.relative_position_buckets, c.relative_position_heads, c.max_relative_distance)
            if c.relative_position_buckets else None
        )
        self.encoder_norm = nn.LayerNorm(c.embed_dim)
        self.layers = nn.ModuleList(self._build_layer(layer) for layer in c.layers)
        self.prediction_heads = (
            PredictionHeads(c.embed_dim, len(c.pred_layer_id), c.pred_inter_dim, c.pred_out_dim)
            if c.pred_layer_id
            else None
        )

    @property
    def input_dtype(self) -> torch.dtype:
        """The float type waveforms are cast to: the model's own (every model has ``encoder_norm``)."""
        return self.encoder_norm.weight.dtype

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state_dict: dict[str, Tensor], share: bool = False) -> "SpeechTransformer":
        """Build a model and load ``state_dict`` without paying for a random initialisation first.

        ``share=True`` makes the model use the given tensors themselves (no copy): only for models
        that are read, never trained, since training would change the caller's tensors.
        """
        with torch.device("meta"):
            model = cls(config)
        if share:
            model.load_state_dict(state_dict, assign=True)
            return model
        device = next(iter(state_dict.values())).device if state_dict else torch.device("cpu")
        model = model.to_empty(device=device)
        model.load_state_dict(state_dict)
        return model

    def _build_layer(self, layer: LayerConfig) -> EncoderLayer:
        c = self.config
        biased = c.relative_position_buckets > 0
        head_ids = (layer.head_ids if layer.head_ids is not None else list(range(layer.num_heads))) if biased else None
        return EncoderLayer(
            c.embed_dim,
            layer.num_heads,
            c.head_dim,
            layer.ffn_dim,
            c.layer_norm_first,
            dropout=c.dropout,
            attention_dropout=c.attention_dropout,
            activation_dropout=c.activation_dropout,
            ranks=layer.ranks,
            sparse=layer.sparse,
            attention=layer.attention,
            ffn=layer.ffn,
            head_ids=head_ids,
            # The gate splits the input into one chunk per original head: embed_dim // heads = head_dim features.
            gate_input_dim=c.head_dim if c.gated_relative_position else 0,
        )

    # ----------------------------------------------------------------------------------- padding
    def frame_padding_mask(self, wav_lengths: Tensor, num_samples: int, num_frames: int) -> Tensor:
        """(B, T) mask, True on padded frames, computed by the same rule as S3PRL's upstream."""
        if self.config.frontend == FBANK:  # each utterance's own frame count
            counts = self.feature_extractor.frame_counts(wav_lengths)
            return torch.arange(num_frames, device=wav_lengths.device)[None, :] >= counts[:, None]
        if self.config.kind == HUBERT and not self.config.conv_length_padding:
            # HuBERT folds the sample mask into T equal chunks; a frame is padding if its chunk is.
            sample_pad = torch.arange(num_samples, device=wav_lengths.device)[None, :] >= wav_lengths[:, None]
            usable = num_samples - num_samples % num_frames
            return sample_pad[:, :usable].view(len(wav_lengths), num_frames, -1).all(-1)
        # The distiller applies the conv length arithmetic; torchaudio floors it (and clamps at 0 frames,
        # which gives the same mask), so an utterance shorter than one frame has none there, not one.
        lengths = wav_lengths.clone()
        rounding = "floor" if self.config.kind == TORCHAUDIO else "trunc"
        for _, kernel, stride in self.config.conv_layers:
            lengths = torch.div(lengths - kernel, stride, rounding_mode=rounding) + 1
        return torch.arange(num_frames, device=wav_lengths.device)[None, :] >= lengths[:, None]

    def normalize_waveforms(self, wav: Tensor, wav_lengths: Tensor) -> Tensor:
        """Per-utterance zero mean / unit variance over the valid samples (HuBERT Large's ``normalize``)."""
        valid = (torch.arange(wav.shape[1], device=wav.device)[None, :] < wav_lengths[:, None]).to(wav.dtype)
        count = wav_lengths.to(wav.dtype)[:, None]
        mean = (wav * valid).sum(1, keepdim=True) / count
        var = ((wav - mean) ** 2 * valid).sum(1, keepdim=True) / count
        return (wav - mean) / torch.sqrt(var + 1e-5) * valid

    # ----------------------------------------------------------------------------------- forward
    def forward(self, wav: Tensor, wav_lengths: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """wav: (B, L) zero-padded batch at 16 kHz; wav_lengths: (B,) valid samples.

        Returns (hidden_states, padding_mask): a list of (B, T, D) tensors and the (B, T) frame mask.
        Padded frames hold arbitrary values, as in S3PRL.
        """
        if not torch.is_floating_point(wav):
            raise ValueError(f"wav has dtype {wav.dtype}; expected a float batch of samples in [-1, 1]")
        wav = wav.to(self.input_dtype)  # float64/half/bfloat16 input runs in the model's own precision
        if wav_lengths is None:
            wav_lengths = torch.full((wav.shape[0],), wav.shape[1], device=wav.device, dtype=torch.long)
        if self.config.normalize_waveform:
            wav = self.normalize_waveforms(wav, wav_lengths)
        if self.config.frontend == FBANK:
            features = self.feature_extractor(wav, wav_lengths)
        else:
            features = self.feature_extractor(wav).transpose(1, 2)
        padding_mask = self.frame_padding_mask(wav_lengths, wav.shape[1], features.shape[1])
        if self.feature_scale is not None:
            features = features * self.feature_scale
        if self.feature_norm is not None:
            features = self.feature_norm(features)
        if self.feature_projection is not None:
            features = self.feature_projection(features)

        x = features.masked_fill(padding_mask[..., None], 0.0)
        reports_inputs = self.config.kind == HUBERT  # else: features first, then every layer's output
        states: list[Tensor] = [] if reports_inputs else [x]
        x = x + self.positional_conv(x)
        if not self.config.layer_norm_first:
            x = self.encoder_norm(x)
        x = F.dropout(x, self.config.dropout, self.training)
        # Computed once, as WavLM does in its first layer and hands on to the others.
        position_bias = None if self.relative_position_bias is None else self.relative_position_bias(x.shape[1])
        for layer in self.layers:
            if reports_inputs:
                states.append(x)  # S3PRL's HuBERT reports the input of every layer...
            x = layer(x, padding_mask, position_bias)
            if not reports_inputs:
                states.append(x)  # ...the distiller and MelHuBERT the output of every layer.
        if self.config.layer_norm_first:
            x = self.encoder_norm(x)
        if reports_inputs:
            states.append(x)  # ...and HuBERT the encoder output last.
        if self.prediction_heads is not None:
            states.extend(self.prediction_heads(x))
        return states, padding_mask

    # ----------------------------------------------------------------------- structural changes
    def keep_heads(self, layer: int, heads: Sequence[int]) -> None:
        """Keep only ``heads`` of ``layer`` (the others are removed physically)."""
        block = self.layers[layer]
        if block.attention is None:
            raise ValueError(f"layer {layer} has no attention sublayer (removed), so no heads to keep")
        block.attention = block.attention.keep_heads(heads)
        self.config.layers[layer].num_heads = len(heads)
        if block.attention.head_ids is not None:  # only models with a relative position bias track them
            self.config.layers[layer].head_ids = list(block.attention.head_ids)

    def keep_units(self, layer: int, units: Sequence[int]) -> None:
        """Keep only the FFN hidden ``units`` of ``layer``."""
        block = self.layers[layer]
        if block.feed_forward is None:
            raise ValueError(f"layer {layer} has no FFN sublayer (removed), so no units to keep")
        block.feed_forward = block.feed_forward.keep_units(units)
        self.config.layers[layer].ffn_dim = len(units)

    def keep_channels(self, conv_layer: int, channels: Sequence[int]) -> None:
        """Keep only the output ``channels`` of front-end conv ``conv_layer``, in that order.

        The next conv's inputs follow; for the last conv layer the feature LayerNorm and the
        feature projection's input columns too.
        """
        c = self.config
        if c.frontend == FBANK:
            raise ValueError("an fbank front end has no conv channels to prune")
        if not 0 <= conv_layer < len(c.conv_layers):
            raise ValueError(f"conv layer {conv_layer} does not exist; the front end has {len(c.conv_layers)}")
        last = conv_layer == len(c.conv_layers) - 1
        if last and self.feature_projection is None:
            raise ValueError(
                "the last conv layer feeds the encoder directly (conv channels == embed_dim, no feature "
                "projection), so its channels cannot be pruned; prune the other conv layers"
            )
        self.feature_extractor = self.feature_extractor.keep_channels(conv_layer, channels)
        if last:
            index = torch.as_tensor([int(i) for i in channels], dtype=torch.long)
            if self.feature_norm is not None:
                self.feature_norm = select_norm(self.feature_norm, channels)
            if self.feature_scale is not None:
                self.feature_scale = self.feature_scale[index]
            self.feature_projection = select_columns(self.feature_projection, index)
        _, kernel, stride = c.conv_layers[conv_layer]
        c.conv_layers[conv_layer] = (len(channels), kernel, stride)
        if last and c.conv_dim == c.embed_dim:
            c.feature_projection = True  # the projection stays, though the widths now agree

    def remove_attention(self, layer: int) -> None:
        """Remove the attention sublayer of ``layer`` (all heads and out_proj's bias): a residual path is left."""
        block = self.layers[layer]
        if block.attention is None:
            raise ValueError(f"layer {layer} has no attention sublayer left to remove")
        self.layers[layer] = block.without_attention()
        config = self.config.layers[layer]
        config.num_heads, config.attention, config.head_ids = 0, False, None
        _drop_linear_options(config, ATTENTION_LINEARS)

    def remove_ffn(self, layer: int) -> None:
        """Remove the feed-forward sublayer of ``layer`` (all units and fc2's bias): a residual path is left."""
        block = self.layers[layer]
        if block.feed_forward is None:
            raise ValueError(f"layer {layer} has no FFN sublayer left to remove")
        self.layers[layer] = block.without_ffn()
        config = self.config.layers[layer]
        config.ffn_dim, config.ffn = 0, False
        _drop_linear_options(config, ("fc1", "fc2"))

    def linear(self, layer: int, name: str) -> nn.Module:
        """The Linear ``name`` (q_proj, k_proj, v_proj, out_proj, fc1, fc2) of ``layer``."""
        block = self.layers[layer]
        sublayer = block.attention if name in ATTENTION_LINEARS else block.feed_forward
        if sublayer is None:
            raise ValueError(
                f"layer {layer} has no {name}: its {'attention' if name in ATTENTION_LINEARS else 'FFN'} sublayer "
                "was removed (iterate over config.layers[i].linear_names)"
            )
        return getattr(sublayer, name)

    def replace_linear(self, layer: int, name: str, module: nn.Module) -> None:
        """Put ``module`` (dense, low-rank or masked, same in/out sizes) in place of a Linear; the config follows."""
        old = self.linear(layer, name)
        if (module.in_features, module.out_features) != (old.in_features, old.out_features):
            raise ValueError(f"layer {layer} {name}: replacement changes the Linear's shape")
        block = self.layers[layer]
        setattr(block.attention if name in ATTENTION_LINEARS else block.feed_forward, name, module)  # exists: linear() checked
        config = self.config.layers[layer]
        if isinstance(module, LowRankLinear):
            config.ranks[name] = module.rank
        else:
            config.ranks.pop(name, None)
        if isinstance(module, MaskedLinear):
            if name not in config.sparse:
                config.sparse.append(name)
        elif name in config.sparse:
            config.sparse.remove(name)

    def prune_weights(self, layer: int, name: str, keep: Tensor) -> None:
        """Zero the weights of a dense Linear where ``keep`` is False, keeping the mask (masks only grow)."""
        linear = self.linear(layer, name)
        if isinstance(linear, MaskedLinear):
            linear.set_mask(linear.mask & keep.to(linear.mask.device))
        elif isinstance(linear, nn.Linear):
            self.replace_linear(layer, name, MaskedLinear.from_linear(linear, keep))
        else:
            raise ValueError(f"layer {layer} {name}: only dense Linears can be weight-pruned, not {type(linear).__name__}")

    def set_sparse_execution(self, mode: str | None) -> dict[str, str]:
        """Run masked Linears ``auto``/``dense``/``sparse`` (None: the environment variable, else auto).

        Returns the kernel each masked Linear will run without autograd, by module name.
        """
        return set_execution(self, mode)

    # ------------------------------------------------------------------------------------ costs
    def num_parameters(self, encoder_only: bool = False) -> int:
        modules = list(self.layers) if encoder_only else [self]
        return sum(p.numel() for m in modules for p in m.parameters())
