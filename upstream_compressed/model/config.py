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
KINDS = (HUBERT, DISTILLER, MELHUBERT)

# Front ends: HuBERT's strided convolutions on the waveform, or MelHuBERT's Kaldi log-mel filterbank.
CONV, FBANK = "conv", "fbank"
FRONTENDS = (CONV, FBANK)
FBANK_SHIFT = 160  # samples between fbank frames (10 ms at 16 kHz)
FBANK_WINDOW = 400  # samples in one fbank window (25 ms): the least audio that yields a frame
FBANK_ONLY_FIELDS = ("fbank_mel_bins", "fbank_stack")

# Linear layers of one encoder layer that may be factorised or sparsified (masked).
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class LayerConfig:
    """One encoder layer: heads, FFN width, which Linears are low-rank and which carry a pruning mask."""

    num_heads: int
    ffn_dim: int
    ranks: dict[str, int] = field(default_factory=dict)  # Linear name -> rank of its B·A factors
    sparse: list[str] = field(default_factory=list)  # Linear names with a weight mask (weight pruning)

    def __post_init__(self) -> None:
        if self.num_heads < 0 or self.ffn_dim < 0:
            raise ValueError(f"negative size in layer config {self}")
        self.sparse = list(self.sparse)
        unknown = (set(self.ranks) | set(self.sparse)) - set(LINEAR_NAMES)
        if unknown:
            raise ValueError(f"unknown Linear names {sorted(unknown)}; known: {LINEAR_NAMES}")
        if len(set(self.sparse)) != len(self.sparse):
            raise ValueError(f"sparse Linear names repeat: {self.sparse}")
        both = set(self.ranks) & set(self.sparse)
        if both:
            raise ValueError(f"Linears {sorted(both)} cannot be both low-rank and sparse")


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
