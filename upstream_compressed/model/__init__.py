"""One Transformer for every base and compressed model; structure is data (:class:`ModelConfig`)."""

from .config import DISTILLER, HUBERT, LINEAR_NAMES, MELHUBERT, LayerConfig, ModelConfig
from .transformer import SpeechTransformer

__all__ = ["DISTILLER", "HUBERT", "LINEAR_NAMES", "MELHUBERT", "LayerConfig", "ModelConfig", "SpeechTransformer"]
