"""Model configuration: one dataclass and named presets, `ModelConfig.from_name(name, **overrides)`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot be built: unknown name or field, wrong type, impossible sizes."""


ARCHS = ("encoder_decoder", "decoder_only")
ACTIVATIONS = ("relu", "gelu")


@dataclass
class ModelConfig:
    arch: str = "encoder_decoder"
    vocab_size: int | None = None  # target (or shared) vocabulary; filled from the tokenizer when training
    src_vocab_size: int | None = None  # None: the same vocabulary as the target
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    dropout: float = 0.1  # on each sublayer output and on embeddings + positions (Section 5.4)
    attention_dropout: float = 0.0  # on attention weights (not in the paper)
    activation_dropout: float = 0.0  # inside the feed-forward, after the activation (not in the paper)
    activation: str = "relu"
    norm_first: bool = False  # False: the paper's post-norm LN(x + Sublayer(x)); True: pre-norm
    max_positions: int = 1024
    share_embeddings: bool = True  # one matrix for source and target embeddings (needs one vocabulary)
    tie_output: bool = True  # the pre-softmax projection is the target embedding matrix
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def source_vocab_size(self) -> int | None:
        return self.src_vocab_size if self.src_vocab_size is not None else self.vocab_size

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        if self.arch not in ARCHS:
            raise ConfigError(f"arch={self.arch!r}: expected one of {', '.join(ARCHS)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        for name in ("d_model", "n_heads", "d_ff", "max_positions"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.d_model % 2:
            raise ConfigError(f"d_model={self.d_model} must be even for sinusoidal positions")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must lie in [0, 1)")
        if self.n_decoder_layers < 1:
            raise ConfigError(f"n_decoder_layers={self.n_decoder_layers}: need at least one decoder layer")
        if self.arch == "encoder_decoder" and self.n_encoder_layers < 1:
            raise ConfigError(f"n_encoder_layers={self.n_encoder_layers}: an encoder-decoder needs at least one")
        if self.arch == "decoder_only" and self.n_encoder_layers != 0:
            raise ConfigError(
                f"arch=decoder_only has no encoder but n_encoder_layers={self.n_encoder_layers}: set it to 0"
            )
        for name in ("vocab_size", "src_vocab_size"):
            value = getattr(self, name)
            if value is not None and value < 4:
                raise ConfigError(f"{name}={value}: too small to hold pad/bos/eos/unk")
        if self.share_embeddings and self.arch == "encoder_decoder" and self.source_vocab_size != self.vocab_size:
            raise ConfigError(
                f"share_embeddings needs one vocabulary, got src_vocab_size={self.src_vocab_size} "
                f"and vocab_size={self.vocab_size}"
            )
        specials = [self.pad_id, self.bos_id, self.eos_id, self.unk_id]
        if len(set(specials)) != 4 or min(specials) < 0:
            raise ConfigError(f"pad/bos/eos/unk ids must be distinct and non-negative, got {specials}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(name: str, value: Any, annotation: str) -> None:
    """Reject values of the wrong type early, with the field's name (YAML makes `1e-3` a string, say)."""
    allowed = [t.strip() for t in str(annotation).split("|")]
    checks = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
              "None": lambda v: v is None}
    if any(checks[t](value) for t in allowed if t in checks):
        return
    raise ConfigError(f"{name}={value!r} has type {type(value).__name__}; expected {annotation}")


# Table 3 of the paper for base and big; the others are common settings or sized for this project.
PRESETS: dict[str, dict[str, Any]] = {
    "transformer_base": dict(d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6, dropout=0.1),
    "transformer_big": dict(d_model=1024, n_heads=16, d_ff=4096, n_encoder_layers=6, n_decoder_layers=6, dropout=0.3),
    # fairseq's transformer_iwslt_de_en: the usual small model for IWSLT14 de-en (dropout 0.3 in its recipe).
    "transformer_iwslt": dict(d_model=512, n_heads=4, d_ff=1024, n_encoder_layers=6, n_decoder_layers=6, dropout=0.3),
    # Multi30k on a CPU: 29k short sentences want a narrow, shallow model.
    "small": dict(d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=3, n_decoder_layers=3, dropout=0.1,
                  max_positions=256),
    "tiny": dict(d_model=32, n_heads=2, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0,
                 max_positions=128),
    # Decoder-only language models built from the same Block.
    "lm_small": dict(arch="decoder_only", d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=0,
                     n_decoder_layers=4, dropout=0.1, max_positions=512),
    "lm_tiny": dict(arch="decoder_only", d_model=32, n_heads=2, d_ff=64, n_encoder_layers=0,
                    n_decoder_layers=2, dropout=0.0, max_positions=128),
}


def preset_names() -> list[str]:
    return list(PRESETS)
