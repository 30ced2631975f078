"""Word alignments from cross-attention, in the Pharaoh format: `0-0 1-2 ...`, source word - target word.

The model reads its own translation again, teacher-forced, and each target token is linked to the source token
that one decoder layer's cross-attention, averaged over its heads, weighs most (the source's EOS, a resting place
for attention, left out, as fairseq does). The default layer is the penultimate one: Garg et al. (2019, "Jointly
Learning to Align and Translate with Transformer Models") found it aligns best in a Transformer trained without
alignment supervision; the last layer attends more to what the next word needs than to its source. Marian and
fairseq get sharper alignments by training one head on external alignments (guided alignment); that is not
done here. Tokens map back to whitespace words: a sentencepiece piece starting with '▁' starts a word.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .model import EncoderDecoder

DEFAULT_LAYER = -2


@torch.inference_mode()
def cross_attention(model: EncoderDecoder, sources: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                    layer: int = DEFAULT_LAYER, batch_size: int = 64) -> list[Tensor]:
    """Per sentence, decoder layer `layer`'s cross-attention averaged over heads, (len(output) + 1, len(source) + 1):
    row j is the step that predicts output token j (the last, EOS), column i is source token i (the last, EOS)."""
    if not isinstance(model, EncoderDecoder):
        raise ValueError("alignments come from cross-attention: they need an encoder-decoder model")
    cfg, device = model.cfg, next(model.parameters()).device
    n_layers = len(model.decoder.blocks)
    if layer == DEFAULT_LAYER and n_layers == 1:
        layer = 0  # no penultimate layer: the only one
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"alignment layer {layer}: the decoder has {n_layers} layers")
    attention = model.decoder.blocks[layer].cross_attn
    seen: dict = {}

    def capture(module, args, kwargs, result):  # the layer's input as the forward pass computes it
        seen["x"], seen["mask"], seen["memory"] = args[0], args[1], kwargs["memory"]

    handle = attention.register_forward_hook(capture, with_kwargs=True)
    weights: list[Tensor] = []
    try:
        for start in range(0, len(sources), batch_size):
            src_batch, out_batch = sources[start:start + batch_size], outputs[start:start + batch_size]
            src = _padded([[*s, cfg.eos_id] for s in src_batch], cfg.pad_id, device)
            tgt = _padded([[cfg.bos_id, *o] for o in out_batch], cfg.pad_id, device)
            model(src, tgt)
            probs = attention.probabilities(seen["x"], seen["memory"], seen["mask"]).mean(dim=1).cpu()
            weights += [p[:len(o) + 1, :len(s) + 1] for p, s, o in zip(probs, src_batch, out_batch)]
    finally:
        handle.remove()
    return weights


def _padded(rows: list[list[int]], pad: int, device) -> Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def token_links(weights: Tensor) -> list[tuple[int, int]]:
    """(source token, target token) pairs: each target token with the source token it attends to most."""
    if weights.size(0) < 2 or weights.size(1) < 2:  # an empty output or source: nothing to link
        return []
    best = weights[:-1, :-1].argmax(dim=-1).tolist()
    return [(i, j) for j, i in enumerate(best)]


def word_of_piece(pieces: Sequence[str]) -> list[int]:
    """For each sentencepiece piece, the index of the whitespace word it belongs to."""
    index, word = [], -1
    for piece in pieces:
        if piece.startswith("\u2581") or word < 0:
            word += 1
        index.append(word)
    return index


def pharaoh(links: Sequence[tuple[int, int]], source_pieces: Sequence[str], target_pieces: Sequence[str]) -> str:
    """Token links as word links, 'i-j' sorted by source then target word, each once."""
    src_word, tgt_word = word_of_piece(source_pieces), word_of_piece(target_pieces)
    return " ".join(f"{i}-{j}" for i, j in sorted({(src_word[i], tgt_word[j]) for i, j in links}))
