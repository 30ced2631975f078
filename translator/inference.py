"""Translating many sentences: sort by length, batch by tokens, decode, restore the input order."""

from __future__ import annotations

from typing import Sequence

import torch

from .config import DecodeConfig
from .decoding import beam_search, greedy, max_lengths, sample
from .model import EncoderDecoder


def batches_by_length(lengths: Sequence[int], batch_tokens: int, max_sentences: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length, each at most batch_tokens tokens padded."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = [[]]
    for i in order:
        batch = batches[-1]
        longest = max([lengths[j] for j in batch] + [lengths[i]])
        if batch and (longest * (len(batch) + 1) > batch_tokens or len(batch) == max_sentences):
            batches.append([i])
        else:
            batch.append(i)
    return [b for b in batches if b]


@torch.no_grad()
def translate_ids(model: EncoderDecoder, sources: Sequence[Sequence[int]], options: DecodeConfig,
                  mode: str = "beam", nbest: int = 1, sampling: dict | None = None,
                  generator: torch.Generator | None = None) -> list[list[list[int]]]:
    """Translate token-id sequences (without EOS). Returns, per input in input order, `nbest` token lists.
    mode: 'beam', 'greedy' or 'sample' (with `sampling` = temperature/top_k/top_p)."""
    cfg = model.cfg
    device = next(model.parameters()).device
    # The source with its EOS must fit max_positions; so must BOS plus the generated tokens (EOS is never fed).
    cap_src = cfg.max_positions - 1
    sources = [list(s)[:cap_src] for s in sources]
    results: list[list[list[int]]] = [[[]] * nbest for _ in sources]
    lengths = [len(s) + 1 for s in sources]
    for batch in batches_by_length(lengths, options.batch_tokens):
        S = max(lengths[i] for i in batch)
        src = torch.full((len(batch), S), cfg.pad_id, dtype=torch.long)
        for row, i in enumerate(batch):
            src[row, :len(sources[i])] = torch.tensor(sources[i], dtype=torch.long)
            src[row, len(sources[i])] = cfg.eos_id
        src = src.to(device)
        limit = max_lengths((src != cfg.pad_id).sum(1), options.max_len_a, options.max_len_b, cap=cfg.max_positions - 1)
        state = model.start(src)
        prefix = torch.full((len(batch), 1), cfg.bos_id, dtype=torch.long, device=device)
        banned = (cfg.pad_id, cfg.bos_id)
        if mode == "beam":
            hyps = beam_search(model.step, state, prefix, limit, cfg.eos_id, beam_size=options.beam,
                               alpha=options.lenpen, lp_form=options.lp_form, nbest=nbest, banned=banned)
            outputs = [[h.tokens for h in hs] for hs in hyps]
        elif mode == "greedy":
            outputs = [[t] for t in greedy(model.step, state, prefix, limit, cfg.eos_id, banned=banned)]
        elif mode == "sample":
            outputs = [[t] for t in sample(model.step, state, prefix, limit, cfg.eos_id, banned=banned,
                                           generator=generator, **(sampling or {}))]
        else:
            raise ValueError(f"decoding mode {mode!r}: expected beam, greedy or sample")
        for row, i in enumerate(batch):
            results[i] = outputs[row]
    return results
