"""The same network in Hugging Face transformers: a MarianMT model holding translator's weights, for side-by-side
speed measurements on identical work. Marian is the post-norm Transformer with sinusoidal positions, scaled
and shared embeddings, and biases everywhere: the paper's layout, as here."""

from __future__ import annotations

import torch

from translator import ModelConfig


def marian_config(cfg: ModelConfig):
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
    """A MarianMTModel with exactly `model`'s weights (an EncoderDecoder with shared embeddings, post-norm)."""
    from transformers import MarianMTModel

    cfg = model.cfg
    if cfg.norm_first or not (cfg.share_embeddings and cfg.tie_output):
        raise ValueError("MarianMT holds post-norm models with shared, tied embeddings")
    hf = MarianMTModel(marian_config(cfg)).eval()
    d = cfg.d_model
    with torch.no_grad():
        hf.model.shared.weight.copy_(model.src_embed.token.weight)
        hf.model.encoder.embed_tokens.weight = hf.model.shared.weight
        hf.model.decoder.embed_tokens.weight = hf.model.shared.weight
        hf.lm_head.weight = hf.model.shared.weight
        hf.final_logits_bias.zero_()
        for stack in (hf.model.encoder, hf.model.decoder):
            stack.embed_positions.weight.copy_(model.src_embed.positions)
        pairs = [(hf.model.encoder.layers, model.encoder.blocks), (hf.model.decoder.layers, model.decoder.blocks)]
        for hf_layers, blocks in pairs:
            for layer, block in zip(hf_layers, blocks):
                attentions = [(layer.self_attn, block.self_attn, layer.self_attn_layer_norm, block.self_attn_norm)]
                if block.cross_attn is not None:
                    attentions.append((layer.encoder_attn, block.cross_attn, layer.encoder_attn_layer_norm,
                                       block.cross_attn_norm))
                for hf_attn, attn, hf_norm, norm in attentions:
                    for i, proj in enumerate((hf_attn.q_proj, hf_attn.k_proj, hf_attn.v_proj)):
                        proj.weight.copy_(attn.qkv.weight[i * d:(i + 1) * d])
                        proj.bias.copy_(attn.qkv.bias[i * d:(i + 1) * d])
                    hf_attn.out_proj.weight.copy_(attn.out.weight)
                    hf_attn.out_proj.bias.copy_(attn.out.bias)
                    hf_norm.load_state_dict(norm.state_dict())
                layer.fc1.load_state_dict(block.ff.up.state_dict())
                layer.fc2.load_state_dict(block.ff.down.state_dict())
                layer.final_layer_norm.load_state_dict(block.ff_norm.state_dict())
    return hf


@torch.no_grad()
def check_same_function(model, hf, src: torch.Tensor, tgt: torch.Tensor) -> float:
    """Max abs difference of the two models' logits on one batch: the comparison is only fair if this is ~0."""
    ours = model(src, tgt)
    theirs = hf(input_ids=src, attention_mask=(src != model.cfg.pad_id).long(), decoder_input_ids=tgt).logits
    return float((ours - theirs).abs().max())
