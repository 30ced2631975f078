"""Export a trained translation model to CTranslate2, a fast inference runtime for deployment.

CTranslate2's Transformer spec stores self-attention Q, K, V as one fused matrix and cross-attention as
Q plus a fused K, V: the same layout as `MultiHeadAttention.qkv`, so weights copy over as they are. The
sinusoidal table is passed explicitly (the runtime's own would interleave sin/cos differently).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from .checkpoint import TOKENIZER, check_replaceable, load_model


def _linear(spec, weight, bias=None) -> None:
    spec.weight = np.ascontiguousarray(weight)
    if bias is not None:
        spec.bias = np.ascontiguousarray(bias)


def _layer_norm(spec, norm) -> None:
    spec.gamma, spec.beta = norm.weight.detach().numpy(), norm.bias.detach().numpy()


def _attention(spec, attention, d_model: int) -> None:
    w, b = attention.qkv.weight.detach().numpy(), attention.qkv.bias.detach().numpy()
    if attention.cross:  # [query] [key; value]
        _linear(spec.linear[0], w[:d_model], b[:d_model])
        _linear(spec.linear[1], w[d_model:], b[d_model:])
    else:  # [query; key; value]
        _linear(spec.linear[0], w, b)
    _linear(spec.linear[-1], attention.out.weight.detach().numpy(), attention.out.bias.detach().numpy())


def _block(spec, block, d_model: int) -> None:
    _attention(spec.self_attention, block.self_attn, d_model)
    _layer_norm(spec.self_attention.layer_norm, block.self_attn_norm)
    if block.cross_attn is not None:
        _attention(spec.attention, block.cross_attn, d_model)
        _layer_norm(spec.attention.layer_norm, block.cross_attn_norm)
    _linear(spec.ffn.linear_0, block.ff.up.weight.detach().numpy(), block.ff.up.bias.detach().numpy())
    _linear(spec.ffn.linear_1, block.ff.down.weight.detach().numpy(), block.ff.down.bias.detach().numpy())
    _layer_norm(spec.ffn.layer_norm, block.ff_norm)


# What a CTranslate2 model directory of ours holds: an existing output with anything else is not replaced.
_EXPORT_FILES = {"model.bin", "config.json", "shared_vocabulary.json", "source_vocabulary.json",
                 "target_vocabulary.json", "vocabulary.json", TOKENIZER}


def to_ctranslate2(model_path: str | Path, output_dir: str | Path, quantization: str | None = None) -> Path:
    """Write a CTranslate2 model directory (with the sentencepiece model beside it) for a run directory.
    An existing output is replaced only if it is an earlier export, and only once the new one is complete."""
    import ctranslate2
    from ctranslate2.specs import common_spec, transformer_spec

    output_dir = Path(output_dir)
    check_replaceable(output_dir, _EXPORT_FILES, "a CTranslate2 export")
    model, tokenizer, _ = load_model(model_path)
    cfg = model.cfg
    if cfg.arch != "encoder_decoder":
        raise ValueError("CTranslate2 export takes encoder-decoder translation models")
    activation = common_spec.Activation.RELU if cfg.activation == "relu" else common_spec.Activation.GELU
    spec = transformer_spec.TransformerSpec.from_config((cfg.n_encoder_layers, cfg.n_decoder_layers), cfg.n_heads,
                                                        pre_norm=cfg.norm_first, activation=activation)
    positions = model.src_embed.positions.numpy()
    for stack_spec, stack, embed in ((spec.encoder, model.encoder, model.src_embed),
                                     (spec.decoder, model.decoder, model.tgt_embed)):
        embeddings = stack_spec.embeddings[0] if isinstance(stack_spec.embeddings, list) else stack_spec.embeddings
        embeddings.weight = embed.token.weight.detach().numpy()
        stack_spec.position_encodings.encodings = positions
        stack_spec.scale_embeddings = True
        for layer_spec, block in zip(stack_spec.layer, stack.blocks):
            _block(layer_spec, block, cfg.d_model)
        if cfg.norm_first:
            _layer_norm(stack_spec.layer_norm, stack.norm)
    output = model.output_weight
    _linear(spec.decoder.projection, output.detach().numpy())
    pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    spec.config.add_source_eos = True  # as training: the source ends with EOS, the target starts from BOS

    class _Converter(ctranslate2.converters.Converter):
        def _load(self):
            return spec

    staging = output_dir.with_name(f".{output_dir.name}.tmp{os.getpid()}")
    try:
        _Converter().convert(str(staging), quantization=quantization, force=True)
        shutil.copyfile(tokenizer.path, staging / TOKENIZER)
        check_replaceable(output_dir, _EXPORT_FILES, "a CTranslate2 export")  # again: it may have changed meanwhile
        if output_dir.exists():
            old = output_dir.with_name(f".{output_dir.name}.old{os.getpid()}")
            os.replace(output_dir, old)
            try:
                os.replace(staging, output_dir)
            except OSError:
                os.replace(old, output_dir)  # the earlier export back where it was
                raise
            shutil.rmtree(old)
        else:
            os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir
