"""Export a trained translation model to CTranslate2 (a fast inference runtime) or Hugging Face transformers.

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

    def write(staging: Path) -> None:
        _Converter().convert(str(staging), quantization=quantization, force=True)
        shutil.copyfile(tokenizer.path, staging / TOKENIZER)

    return _swap_in(output_dir, write, _EXPORT_FILES, "a CTranslate2 export")


def _swap_in(output_dir: Path, write, files: set[str], kind: str) -> Path:
    """Write an export into a staging directory beside output_dir, then put it in place: an earlier export there
    is replaced only once the new one is complete (and put back if the swap fails); anything else is refused."""
    staging = output_dir.with_name(f".{output_dir.name}.tmp{os.getpid()}")
    try:
        write(staging)
        check_replaceable(output_dir, files, kind)  # again: it may have changed meanwhile
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


# -- Hugging Face transformers: MarianMT ------------------------------------------------------------------------

# MarianMT is the paper's layout too (post-norm, sinusoidal positions, scaled and shared embeddings, biases
# everywhere), so a model of ours is a MarianMTModel with the same weights.
_HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "source.spm", "target.spm", "vocab.json",
             "tokenizer_config.json", "special_tokens_map.json", "README.md"}


def marian_config(cfg):
    from transformers import MarianConfig

    return MarianConfig(
        vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.vocab_size, d_model=cfg.d_model,
        encoder_layers=cfg.n_encoder_layers, decoder_layers=cfg.n_decoder_layers,
        encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff, activation_function=cfg.activation,
        max_position_embeddings=cfg.max_positions, scale_embedding=True, share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True, dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout, pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id,
        bos_token_id=cfg.bos_id, decoder_start_token_id=cfg.bos_id, forced_eos_token_id=None)


def to_marian(model):
    """A MarianMTModel computing exactly `model`'s function (an EncoderDecoder with shared embeddings, post-norm).
    Marian lays its sinusoidal table out as all sines, then all cosines, and builds it anew when it loads;
    ours interleaves them (sin, cos, sin, ...). So every model dimension is permuted to Marian's order, in the
    embeddings, every layer's inputs and outputs, and the layer norms: the same network in another basis."""
    import torch
    from transformers import MarianMTModel

    cfg = model.cfg
    if cfg.arch != "encoder_decoder" or cfg.norm_first or not (cfg.share_embeddings and cfg.tie_output):
        raise ValueError("MarianMT holds encoder-decoder, post-norm models with shared, tied embeddings")
    hf = MarianMTModel(marian_config(cfg)).eval()
    d = cfg.d_model
    order = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # Marian's dimension i is our order[i]

    def linear(hf_linear, weight, bias, inputs: bool, outputs: bool) -> None:
        weight = weight[:, order] if inputs else weight
        hf_linear.weight.copy_(weight[order] if outputs else weight)
        hf_linear.bias.copy_(bias[order] if outputs else bias)

    def norm(hf_norm, ours) -> None:
        hf_norm.weight.copy_(ours.weight[order])
        hf_norm.bias.copy_(ours.bias[order])

    with torch.no_grad():
        hf.model.shared.weight.copy_(model.src_embed.token.weight[:, order])
        hf.model.encoder.embed_tokens.weight = hf.model.shared.weight
        hf.model.decoder.embed_tokens.weight = hf.model.shared.weight
        hf.lm_head.weight = hf.model.shared.weight
        hf.final_logits_bias.zero_()
        for stack in (hf.model.encoder, hf.model.decoder):  # what Marian builds for itself, to the last bit here
            stack.embed_positions.weight.copy_(model.src_embed.positions[:, order])
        pairs = [(hf.model.encoder.layers, model.encoder.blocks), (hf.model.decoder.layers, model.decoder.blocks)]
        for hf_layers, blocks in pairs:
            for layer, block in zip(hf_layers, blocks):
                attentions = [(layer.self_attn, block.self_attn, layer.self_attn_layer_norm, block.self_attn_norm)]
                if block.cross_attn is not None:
                    attentions.append((layer.encoder_attn, block.cross_attn, layer.encoder_attn_layer_norm,
                                       block.cross_attn_norm))
                for hf_attn, attn, hf_norm, ours_norm in attentions:
                    for i, proj in enumerate((hf_attn.q_proj, hf_attn.k_proj, hf_attn.v_proj)):
                        linear(proj, attn.qkv.weight[i * d:(i + 1) * d], attn.qkv.bias[i * d:(i + 1) * d], True, False)
                    linear(hf_attn.out_proj, attn.out.weight, attn.out.bias, False, True)
                    norm(hf_norm, ours_norm)
                linear(layer.fc1, block.ff.up.weight, block.ff.up.bias, True, False)
                linear(layer.fc2, block.ff.down.weight, block.ff.down.bias, False, True)
                norm(layer.final_layer_norm, block.ff_norm)
    return hf


def to_huggingface(model_path: str | Path, output_dir: str | Path) -> Path:
    """Write a Hugging Face model directory: a MarianMTModel with the run's weights, its generation settings
    (the recipe's beam and length penalty; pad and BOS never generated, as here), and a MarianTokenizer on the
    run's sentencepiece model, so that `transformers.pipeline("translation", model=DIR)` works."""
    import json

    from transformers import GenerationConfig, MarianTokenizer

    output_dir = Path(output_dir)
    check_replaceable(output_dir, _HF_FILES, "a Hugging Face export")
    model, tokenizer, recipe = load_model(model_path)
    cfg, decode = model.cfg, recipe.decode
    hf = to_marian(model)
    hf.generation_config = GenerationConfig(
        num_beams=decode.beam, length_penalty=decode.lenpen, max_length=cfg.max_positions, early_stopping=True,
        bad_words_ids=[[cfg.pad_id], [cfg.bos_id]], pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id,
        bos_token_id=cfg.bos_id, decoder_start_token_id=cfg.bos_id)

    def write(staging: Path) -> None:
        hf.save_pretrained(staging)
        for name in ("source.spm", "target.spm"):
            shutil.copyfile(tokenizer.path, staging / name)
        vocab = {tokenizer.sp.id_to_piece(i): i for i in range(tokenizer.vocab_size)}
        (staging / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        MarianTokenizer(str(staging / "source.spm"), str(staging / "target.spm"), str(staging / "vocab.json"),
                        source_lang=recipe.data.src_lang, target_lang=recipe.data.tgt_lang,
                        model_max_length=cfg.max_positions).save_pretrained(staging)
        (staging / "README.md").write_text(
            f"# translator {recipe.data.src_lang}->{recipe.data.tgt_lang}, exported as MarianMT\n\n"
            "Beam search here scores with Hugging Face's length penalty, log-probability / |Y|^lenpen; "
            "translator's default is the paper's ((5 + |Y|) / 6)^lenpen, so beam outputs can differ; greedy "
            "outputs are the same.\n", encoding="utf-8")

    return _swap_in(output_dir, write, _HF_FILES, "a Hugging Face export")
