"""Structure as data: everything that shapes a :class:`SpeechTransformer`.

A base model and every compressed variant of it are described by one :class:`ModelConfig`.
Compression changes the numbers in it (heads per layer, FFN width, ranks, which Linears carry
weight-pruning masks), never the code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# The two families of hidden-state layout that S3PRL's upstreams produce.
HUBERT = "hubert"  # [encoder input] + layer outputs (last one after the final LayerNorm if pre-LN)
DISTILLER = "distiller"  # [projected features] + layer outputs + prediction-head outputs
MELHUBERT = "melhubert"  # MelHuBERT's upstream: [projected features] + layer outputs (+ heads once distilled)
# torchaudio's wav2vec2 layout as DPHuBERT's extract_features gives it: [projected features] + layer
# outputs (torchaudio's own extract_features: the layer outputs alone); frames by its floor-and-clamp arithmetic.
TORCHAUDIO = "torchaudio"
KINDS = (HUBERT, DISTILLER, MELHUBERT, TORCHAUDIO)

# Front ends: HuBERT's strided convolutions on the waveform, or MelHuBERT's Kaldi log-mel filterbank.
CONV, FBANK = "conv", "fbank"
FRONTENDS = (CONV, FBANK)
FBANK_SHIFT = 160  # samples between fbank frames (10 ms at 16 kHz)
FBANK_WINDOW = 400  # samples in one fbank window (25 ms): the least audio that yields a frame
FBANK_ONLY_FIELDS = ("fbank_mel_bins", "fbank_stack")

# Linear layers of one encoder layer that may be factorised or sparsified (masked).
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
ATTENTION_LINEAR_NAMES = LINEAR_NAMES[:4]  # the rest belong to the FFN sublayer


@dataclass
class LayerConfig:
    """One encoder layer: heads, FFN width, which Linears are low-rank and which carry a pruning mask.

    ``attention`` / ``ffn`` False: that sublayer is removed (no module at all, not even a bias); the
    layer is then its residual path (a post-LN layer still applies both LayerNorms).
    """

    num_heads: int
    ffn_dim: int
    ranks: dict[str, int] = field(default_factory=dict)  # Linear name -> rank of its B·A factors
    sparse: list[str] = field(default_factory=list)  # Linear names with a weight mask (weight pruning)
    attention: bool = True  # the attention sublayer exists
    ffn: bool = True  # the feed-forward sublayer exists
    # The unpruned model's indices of the heads this layer keeps, in order (None: 0..num_heads-1). Only
    # models with a shared relative position bias (WavLM) record them: they pick its rows and gate chunks.
    head_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if self.num_heads < 0 or self.ffn_dim < 0:
            raise ValueError(f"negative size in layer config {self}")
        if self.head_ids is not None:
            self.head_ids = [int(h) for h in self.head_ids]
            if len(self.head_ids) != self.num_heads or len(set(self.head_ids)) != len(self.head_ids) \
                    or any(h < 0 for h in self.head_ids):
                raise ValueError(f"head_ids {self.head_ids} must be {self.num_heads} distinct non-negative indices "
                                 "(one per kept head)")
        if not self.attention and self.num_heads != 0:
            raise ValueError(f"a layer without its attention sublayer has no heads; got num_heads={self.num_heads}")
        if not self.ffn and self.ffn_dim != 0:
            raise ValueError(f"a layer without its FFN sublayer has no units; got ffn_dim={self.ffn_dim}")
        self.sparse = list(self.sparse)
        unknown = (set(self.ranks) | set(self.sparse)) - set(LINEAR_NAMES)
        if unknown:
            raise ValueError(f"unknown Linear names {sorted(unknown)}; known: {LINEAR_NAMES}")
        if len(set(self.sparse)) != len(self.sparse):
            raise ValueError(f"sparse Linear names repeat: {self.sparse}")
        both = set(self.ranks) & set(self.sparse)
        if both:
            raise ValueError(f"Linears {sorted(both)} cannot be both low-rank and sparse")
        absent = (set(self.ranks) | set(self.sparse)) - set(self.linear_names)
        if absent:
            raise ValueError(f"Linears {sorted(absent)} belong to a removed sublayer; drop them from ranks/sparse")

    @property
    def linear_names(self) -> tuple[str, ...]:
        """The Linears this layer has (those of removed sublayers left out)."""
        return tuple(
            name for name in LINEAR_NAMES
            if (self.attention if name in ATTENTION_LINEAR_NAMES else self.ffn)
        )


@dataclass
class ModelConfig:
    """The whole network. ``kind`` picks the hidden-state layout and padding rule of S3PRL's upstream."""

    kind: str
    embed_dim: int
    head_dim: int
    layers: list[LayerConfig]
    conv_layers: list[tuple[int, int, int]]  # (channels, kernel, stride) per front-end conv (empty for fbank)
    extractor_mode: str = "default"  # "default": GroupNorm on the first conv; "layer_norm": LN on every conv
    conv_bias: bool = False
    conv_pos: int = 128
    conv_pos_groups: int = 16
    layer_norm_first: bool = False
    feature_layer_norm: bool = True  # LayerNorm on the conv features (HuBERT has it, DistilHuBERT not)
    normalize_waveform: bool = False  # per-utterance layer norm of the waveform (HuBERT Large)
    # Padded frames by the conv length arithmetic (wav2vec 2.0's model; the distiller and torchaudio do so
    # anyway), not by HuBERT's equal chunks of the sample mask: the two differ by a frame at some lengths.
    conv_length_padding: bool = False
    activation: str = "gelu"
    # Training-time regularisation (inactive in eval mode, which is how upstreams run).
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    # DistilHuBERT prediction heads: which teacher layers the heads predict (empty: no heads).
    pred_layer_id: list[int] = field(default_factory=list)
    pred_inter_dim: int = 0
    pred_out_dim: int = 0
    # The front end: ``conv`` (conv_layers, extractor_mode, ...) or ``fbank`` (MelHuBERT: Kaldi log-mel
    # features of the 16-bit-scaled waveform, normalised per dimension, ``fbank_stack`` frames
    # concatenated: 1 gives 10 ms frames, 2 gives 20 ms).
    frontend: str = CONV
    fbank_mel_bins: int = 40
    fbank_stack: int = 1
    # Whether front-end features are projected to embed_dim. None: exactly when their widths differ
    # (as built from a checkpoint); True once pruning the last conv layer made them equal by chance.
    feature_projection: bool | None = None
    # A fixed per-channel scale of the front end's features before their LayerNorm (DPHuBERT's
    # ``dummy_weight``: the soft mask that conv-channel pruning leaves on the last conv layer).
    feature_scale: bool = False
    # WavLM's bucketed relative position bias, shared by all layers (0 buckets: none). It has one column per
    # head of the unpruned model, embed_dim // head_dim of them; ``gated_relative_position`` scales it per
    # head and query frame by a gate computed from the layer's input (WavLM's gru_rel_pos).
    relative_position_buckets: int = 0
    max_relative_distance: int = 800
    gated_relative_position: bool = False

    def __post_init__(self) -> None:
        self.layers = [
            layer if isinstance(layer, LayerConfig) else LayerConfig(**layer) for layer in self.layers
        ]
        self.conv_layers = [tuple(int(v) for v in layer) for layer in self.conv_layers]
        self.pred_layer_id = [int(i) for i in self.pred_layer_id]
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; expected one of {KINDS}")
        if self.extractor_mode not in ("default", "layer_norm"):
            raise ValueError(f"unknown extractor_mode {self.extractor_mode!r}")
        if self.activation != "gelu":
            raise ValueError(f"only the gelu activation is supported, not {self.activation!r}")
        if self.embed_dim <= 0 or self.head_dim <= 0:
            raise ValueError("embed_dim and head_dim must be positive")
        if self.frontend not in FRONTENDS:
            raise ValueError(f"unknown frontend {self.frontend!r}; expected one of {FRONTENDS}")
        if self.frontend == CONV and not self.conv_layers:
            raise ValueError("a conv front end needs conv_layers (non-empty)")
        if self.frontend == FBANK:
            if self.conv_layers:
                raise ValueError("an fbank front end has no conv_layers; give an empty list")
            if self.fbank_mel_bins <= 0 or self.fbank_stack not in (1, 2):
                raise ValueError(
                    f"fbank_mel_bins must be positive and fbank_stack 1 (10 ms) or 2 (20 ms), got "
                    f"{self.fbank_mel_bins} and {self.fbank_stack}"
                )

        self._check_relative_position()
        if self.feature_projection is False and self.conv_dim != self.embed_dim:
            raise ValueError(
                f"features of width {self.conv_dim} need a projection to embed_dim {self.embed_dim}; "
                "feature_projection cannot be false"
            )

    def _check_relative_position(self) -> None:
        if self.relative_position_buckets == 0:
            if self.gated_relative_position:
                raise ValueError("gated_relative_position gates the relative position bias; it needs "
                                 "relative_position_buckets > 0")
            if any(layer.head_ids is not None for layer in self.layers):
                raise ValueError("head_ids pick rows of the relative position bias; a model without one "
                                 "(relative_position_buckets 0) has none to record")
            return
        # WavLM's bucketing spends half the buckets per direction, half of those on exact distances: it needs 4+.
        if self.relative_position_buckets < 4:
            raise ValueError(f"relative_position_buckets must be 0 (no bias) or at least 4, got "
                             f"{self.relative_position_buckets}")
        if self.max_relative_distance <= self.relative_position_buckets // 4:
            raise ValueError(f"max_relative_distance {self.max_relative_distance} must exceed the exact range "
                             f"{self.relative_position_buckets // 4} (relative_position_buckets // 4)")
        if self.embed_dim % self.head_dim:
            raise ValueError(f"a relative position bias has one column per original head, embed_dim // head_dim; "
                             f"embed_dim {self.embed_dim} is not a multiple of head_dim {self.head_dim}")
        for i, layer in enumerate(self.layers):
            ids = layer.head_ids if layer.head_ids is not None else range(layer.num_heads)
            if any(h >= self.relative_position_heads for h in ids):
                raise ValueError(f"layer {i}: head ids {list(ids)} must be below the bias's "
                                 f"{self.relative_position_heads} original heads")

    @property
    def relative_position_heads(self) -> int:
        """Columns of the relative position bias: the unpruned model's heads (0 without a bias)."""
        return self.embed_dim // self.head_dim if self.relative_position_buckets else 0

    @property
    def has_feature_projection(self) -> bool:
        """Whether the model has a ``feature_projection`` Linear (conv_dim -> embed_dim)."""
        if self.feature_projection is None:
            return self.conv_dim != self.embed_dim
        return self.feature_projection

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def conv_dim(self) -> int:
        """Width of the front end's features (conv channels, or fbank bins x stacked frames)."""
        if self.frontend == FBANK:
            return self.fbank_mel_bins * self.fbank_stack
        return self.conv_layers[-1][0]

    @property
    def downsample_rate(self) -> int:
        if self.frontend == FBANK:
            return FBANK_SHIFT * self.fbank_stack
        rate = 1
        for _, _, stride in self.conv_layers:
            rate *= stride
        return rate

    @property
    def receptive_field(self) -> int:
        """Samples that the front end needs to produce one frame."""
        if self.frontend == FBANK:
            return FBANK_WINDOW  # a stacked frame whose partner is missing is zero-padded, as MelHuBERT does
        field_, jump = 1, 1
        for _, kernel, stride in self.conv_layers:
            field_ += (kernel - 1) * jump
            jump *= stride
        return field_

    @property
    def num_hidden_states(self) -> int:
        return self.num_layers + 1 + len(self.pred_layer_id)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["conv_layers"] = [list(layer) for layer in self.conv_layers]
        for layer in data["layers"]:  # dense models keep the manifests they had before weight pruning existed
            if not layer["sparse"]:
                del layer["sparse"]
            for name in ("attention", "ffn"):  # ... and before sublayers could be removed
                if layer[name]:
                    del layer[name]
            if layer["head_ids"] is None:  # ... and before WavLM's bias needed the original head indices
                del layer["head_ids"]
        if not self.conv_length_padding:  # models other than wav2vec 2.0 keep their manifests
            del data["conv_length_padding"]
        if self.feature_projection is None:
            del data["feature_projection"]
        if not self.feature_scale:
            del data["feature_scale"]
        for name, default in (("relative_position_buckets", 0), ("max_relative_distance", 800),
                              ("gated_relative_position", False)):  # models without WavLM's bias keep their manifests
            if data[name] == default:
                del data[name]
        if self.frontend == CONV:  # conv models keep the manifests they had before fbank front ends existed
            del data["frontend"]
            for name in FBANK_ONLY_FIELDS:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}")
        return cls(**data)
