"""translator: the 2017 Transformer for machine translation, and its decoder-only sibling."""

from .config import ConfigError, ModelConfig
from .model import DecoderOnly, EncoderDecoder, build_model, count_parameters

__version__ = "0.1.0"
__all__ = ["ConfigError", "ModelConfig", "DecoderOnly", "EncoderDecoder", "build_model", "count_parameters"]
