"""Translating many sentences: sort by length, batch by tokens, decode, restore the input order."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Sequence

import torch
from torch import nn

from .config import DecodeConfig
from .cuda_graphs import GraphedStep, StaticDecodeState
from .decoding import (DraftModel, EnsembleState, ForcedState, Hypothesis, SpeculationStats, beam_search, ensemble,
                       forced_prefix, greedy, max_lengths, sample, self_speculative)
from .model import DecoderOnly, EncoderDecoder


class Ensemble(nn.Module):
    """Several translation models decoding as one (translate --model A --model B): each step averages their
    next-token log-probabilities. They must share the vocabulary, special tokens and architecture; sources and
    outputs are limited by the shortest max_positions among them."""

    def __init__(self, models: Sequence[EncoderDecoder | DecoderOnly]):
        super().__init__()
        first = models[0].cfg
        for model in models[1:]:
            cfg = model.cfg
            differ = [name for name in ("arch", "vocab_size", "source_vocab_size", "pad_id", "bos_id", "eos_id",
                                        "prefix_lm") if getattr(cfg, name) != getattr(first, name)]
            if differ:
                raise ValueError(f"ensemble members differ in {', '.join(differ)}: "
                                 f"{', '.join(f'{getattr(first, n)} vs {getattr(cfg, n)}' for n in differ)}")
        self.models = nn.ModuleList(models)
        self.cfg = dataclasses.replace(first, max_positions=min(m.cfg.max_positions for m in models))
        self._step = ensemble([m.step for m in models])

    def start(self, source: torch.Tensor) -> EnsembleState:
        return EnsembleState([m.start(source) for m in self.models])

    def step(self, tokens: torch.Tensor, state: EnsembleState) -> torch.Tensor:
        return self._step(tokens, state)


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


def _encoder_decoder_batch(model: EncoderDecoder, sources: list[list[int]], options: DecodeConfig):
    """Source batch (padded, EOS-closed), its encoder state, a BOS column to start from, and output limits."""
    cfg, device = model.cfg, next(model.parameters()).device
    width = max(len(s) for s in sources) + 1
    src = torch.tensor([[*s, cfg.eos_id] + [cfg.pad_id] * (width - len(s) - 1) for s in sources], dtype=torch.long,
                       device=device)  # built on the host in one piece: a row at a time was two operations per row
    # The paper's limit counts the source's tokens, not its EOS; BOS plus the generated tokens must fit
    # max_positions (EOS is never fed).
    lengths = torch.tensor([len(s) for s in sources], device=device)
    limit = max_lengths(lengths, options.max_len_a, options.max_len_b, cap=cfg.max_positions - 1)
    prefix = torch.full((len(sources), 1), cfg.bos_id, dtype=torch.long, device=device)
    return model.start(src), prefix, limit


def _decoder_only_batch(model: DecoderOnly, sources: list[list[int]], options: DecodeConfig):
    """Prompts BOS source EOS, left-padded so that every row continues at the same step."""
    cfg, device = model.cfg, next(model.parameters()).device
    width = max(len(s) for s in sources) + 2
    prompt = torch.tensor([[cfg.pad_id] * (width - len(s) - 2) + [cfg.bos_id, *s, cfg.eos_id] for s in sources],
                          dtype=torch.long, device=device)
    lengths = torch.tensor([len(s) for s in sources], device=device)
    limit = max_lengths(lengths, options.max_len_a, options.max_len_b, cap=cfg.max_positions - width)
    return model.start(prompt), prompt, limit


def source_limit(model: EncoderDecoder | DecoderOnly) -> int:
    """The longest source, in tokens, that the model can read (longer ones are truncated)."""
    cfg = model.cfg
    return cfg.max_positions - 1 if cfg.arch == "encoder_decoder" else cfg.max_positions // 2 - 2


def translate_ids(model: EncoderDecoder | DecoderOnly | Ensemble, sources: Sequence[Sequence[int]],
                  options: DecodeConfig, mode: str = "beam", nbest: int = 1, sampling: dict | None = None,
                  generator: torch.Generator | None = None,
                  prefixes: Sequence[Sequence[int]] | None = None) -> list[list[list[int]]]:
    """Translate token-id sequences (without EOS) with an encoder-decoder or a decoder-only translation model
    (or an Ensemble of them). Returns, per input in input order, `nbest` token lists. mode: 'beam', 'greedy' or
    'sample' (with `sampling` = temperature/top_k/top_p/epsilon). `prefixes`: per input, target tokens the output must
    start with (empty: none); they are part of the returned tokens."""
    found = translate_hypotheses(model, sources, options, mode, nbest, sampling, generator, prefixes)
    return [[h.tokens for h in hyps] for hyps in found]


@torch.inference_mode()  # cheaper than no_grad for the many small ops of a decoding step
def translate_hypotheses(model: EncoderDecoder | DecoderOnly | Ensemble, sources: Sequence[Sequence[int]],
                         options: DecodeConfig, mode: str = "beam", nbest: int = 1, sampling: dict | None = None,
                         generator: torch.Generator | None = None,
                         prefixes: Sequence[Sequence[int]] | None = None) -> list[list[Hypothesis]]:
    """translate_ids with the hypotheses' scores (beam search's; nan for greedy and sampling, which keep none)."""
    cfg = model.cfg
    if mode not in ("beam", "greedy", "sample"):
        raise ValueError(f"decoding mode {mode!r}: expected beam, greedy or sample")
    if options.cuda_graphs and isinstance(model, Ensemble):
        raise ValueError("cuda_graphs decodes one model; an ensemble runs without it")
    sources = [list(s)[:source_limit(model)] for s in sources]
    prepare = _encoder_decoder_batch if cfg.arch == "encoder_decoder" else _decoder_only_batch
    results: list[list[Hypothesis]] = [[Hypothesis([], float("nan"))] * nbest for _ in sources]
    banned = (cfg.pad_id, cfg.bos_id)
    lengths = [len(s) + 1 for s in sources]
    for batch in batches_by_length(lengths, options.batch_tokens):
        state, prefix, limit = prepare(model, [sources[i] for i in batch], options)
        step = model.step
        forced = None
        if prefixes is not None and any(prefixes[i] for i in batch):
            forced = [list(prefixes[i]) for i in batch]
            room = cfg.max_positions - prefix.size(1)  # positions left for output tokens (EOS is never fed)
            if max(map(len, forced)) > room:
                raise ValueError(f"a target prefix of {max(map(len, forced))} tokens leaves no room in the model's "
                                 f"{cfg.max_positions} positions")
            # A prefix longer than the usual output limit raises the limit to its length.
            limit = torch.maximum(limit, torch.tensor([len(p) for p in forced], device=limit.device)).clamp(max=room)
        if options.cuda_graphs:  # fixed shapes: room for every beam and for the longest output (EOS is not fed)
            rows = len(batch) * (options.beam if mode == "beam" else 1)
            state = StaticDecodeState(model, state, rows, positions=prefix.size(1) + int(limit.max()))
            step = GraphedStep(model, capture=prefix.is_cuda)
        else:
            for member in getattr(state, "states", [state]):
                member.reuse_logits = True  # the decoding functions read each step's logits before the next step
        if forced is not None:
            width = max(map(len, forced))
            table = torch.tensor([p + [-1] * (width - len(p)) for p in forced], device=prefix.device)
            state, step = ForcedState(state, table, start=prefix.size(1)), forced_prefix(step)
        if mode == "beam":
            outputs = beam_search(step, state, prefix, limit, cfg.eos_id, beam_size=options.beam,
                                  alpha=options.lenpen, lp_form=options.lp_form, nbest=nbest, banned=banned,
                                  stop=options.beam_stop)
        elif mode == "greedy":
            outputs = [[Hypothesis(t, float("nan"))] for t in greedy(step, state, prefix, limit, cfg.eos_id, banned=banned)]
        else:
            outputs = [[Hypothesis(t, float("nan"))] for t in sample(step, state, prefix, limit, cfg.eos_id,
                                                                     banned=banned, generator=generator,
                                                                     **(sampling or {}))]
        for row, i in enumerate(batch):
            results[i] = outputs[row]
    return results


def _speculate(model: EncoderDecoder | DecoderOnly, sources: list[list[int]], options: DecodeConfig, proposer,
               sampling: dict | None, generator: torch.Generator | None,
               draft: EncoderDecoder | DecoderOnly | None = None) -> tuple[list[list[int]], SpeculationStats]:
    """self_speculative over batches of similar length; proposer(state, prefix) makes a batch's proposer, given the
    draft's state when there is a draft model. Rounds propose while a batch has at most options.speculate_rows
    unfinished rows."""
    cfg = model.cfg
    prepare = _encoder_decoder_batch if cfg.arch == "encoder_decoder" else _decoder_only_batch
    results: list[list[int]] = [[] for _ in sources]
    stats = SpeculationStats()
    for batch in batches_by_length([len(s) + 1 for s in sources], options.batch_tokens):
        state, prefix, limit = prepare(model, [sources[i] for i in batch], options)
        state.position_cap = cfg.max_positions - 1  # proposals past a row's limit are never kept
        draft_state = None
        if draft is not None:
            draft_state, _, draft_limit = prepare(draft, [sources[i] for i in batch], options)
            draft_state.position_cap, limit = draft.cfg.max_positions - 1, torch.minimum(limit, draft_limit)
        outputs, counts = self_speculative(model.hidden, model.logits, proposer(draft_state, prefix), state, prefix,
                                           limit, cfg.eos_id, banned=(cfg.pad_id, cfg.bos_id), sampling=sampling,
                                           generator=generator,
                                           max_rows=options.speculate_rows or None)
        for row, i in enumerate(batch):
            results[i] = outputs[row]
        stats.add(counts)
    return results, stats


@torch.inference_mode()  # cheaper than no_grad for the many small ops of a decoding step
def self_speculative_ids(model: EncoderDecoder | DecoderOnly, sources: Sequence[Sequence[int]], options: DecodeConfig,
                         sampling: dict | None = None, generator: torch.Generator | None = None,
                         k: int | None = None) -> tuple[list[list[int]], SpeculationStats]:
    """Translate with the model's first k draft heads (default all) proposing and the model verifying, in batches
    of similar length (options.batch_tokens; 1 sentence per batch when batch_tokens is 1). Greedy (sampling=None)
    gives exactly translate_ids' greedy output. Returns the outputs in input order and the speculation's counts."""
    k = check_draft_heads(model, k)
    sources = [list(s)[:source_limit(model)] for s in sources]
    return _speculate(model, sources, options, lambda _, prefix: partial(model.draft, k=k), sampling, generator)


def check_draft_heads(model: EncoderDecoder | DecoderOnly, k: int | None) -> int:
    """The number of draft heads to propose with: k, or all the model has; refused where it has none or fewer.
    Fewer heads than trained can be faster: a verification pass costs more with each row it checks, and the
    last heads' proposals are kept least often."""
    heads = model.cfg.draft_heads
    if not heads:
        raise ValueError("the model has no draft heads (model.draft_heads is 0): train some onto it with "
                         "translator train --init-from RUN --model.draft_heads=3 --train.freeze=base")
    if k is not None and not 1 <= k <= heads:
        raise ValueError(f"--draft-k {k}: the model has {heads} draft heads; propose with 1 to {heads} of them")
    return heads if k is None else k


@torch.inference_mode()  # cheaper than no_grad for the many small ops of a decoding step
def speculative_ids(model: EncoderDecoder | DecoderOnly, draft: EncoderDecoder | DecoderOnly,
                    sources: Sequence[Sequence[int]], options: DecodeConfig, k: int = 4, sampling: dict | None = None,
                    generator: torch.Generator | None = None) -> tuple[list[list[int]], float]:
    """Translate with speculative decoding, in batches of similar length: `draft`, a smaller model of the same
    architecture and vocabulary, proposes k tokens and `model` checks them in one pass. Greedy (sampling=None)
    gives exactly `model`'s greedy output. Returns the outputs in input order and the acceptance rate."""
    cfg = model.cfg
    if draft.cfg.arch != cfg.arch or draft.cfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"the draft model ({draft.cfg.arch}, vocabulary {draft.cfg.vocab_size}) must match the "
                         f"translation model ({cfg.arch}, vocabulary {cfg.vocab_size})")
    sources = [list(s)[:min(source_limit(model), source_limit(draft))] for s in sources]
    results, stats = _speculate(model, sources, options,
                                lambda draft_state, prefix: DraftModel(draft.hidden, draft.logits, draft_state, prefix, k),
                                sampling, generator, draft)
    return results, stats.accepted / max(stats.proposed, 1)


@torch.inference_mode()  # cheaper than no_grad for the many small ops of a decoding step
def generate_ids(model: DecoderOnly, prompts: Sequence[Sequence[int]], max_new_tokens: int, mode: str = "sample",
                 sampling: dict | None = None, generator: torch.Generator | None = None,
                 batch_tokens: int = 8192, speculate_heads: bool = False,
                 draft_k: int | None = None, speculate_rows: int = DecodeConfig.speculate_rows) -> list[list[int]]:
    """Continue each prompt (token ids) with a language model, up to max_new_tokens or EOS, in batches of
    similar length. Prompts start after an EOS, as every line does in the packed training stream. With
    speculate_heads, the model's first draft_k draft heads (default all) propose and the model verifies (greedy:
    the same output), while a batch has at most speculate_rows unfinished prompts (0: always)."""
    cfg, device = model.cfg, next(model.parameters()).device
    keep = cfg.max_positions - 2  # room for the leading EOS and at least one new token
    prompts = [list(p)[-keep:] for p in prompts]
    results: list[list[int]] = [[] for _ in prompts]
    k = check_draft_heads(model, draft_k) if speculate_heads else None
    for batch in batches_by_length([len(p) + 1 for p in prompts], batch_tokens):
        width = max(len(prompts[i]) for i in batch) + 1
        tokens = torch.tensor([[cfg.pad_id] * (width - len(prompts[i]) - 1) + [cfg.eos_id, *prompts[i]] for i in batch],
                              dtype=torch.long, device=device)
        limit = min(max_new_tokens, cfg.max_positions - width)
        banned = (cfg.pad_id, cfg.bos_id)
        if speculate_heads:
            state = model.start(tokens)
            state.position_cap = cfg.max_positions - 1
            out, _ = self_speculative(model.hidden, model.logits, partial(model.draft, k=k),
                                      state, tokens, limit, cfg.eos_id, banned=banned,
                                      sampling=None if mode == "greedy" else (sampling or {}), generator=generator,
                                      max_rows=speculate_rows or None)
        elif mode == "greedy":
            out = greedy(model.step, model.start(tokens), tokens, limit, cfg.eos_id, banned=banned)
        else:
            out = sample(model.step, model.start(tokens), tokens, limit, cfg.eos_id, banned=banned, generator=generator,
                         **(sampling or {}))
        for row, i in enumerate(batch):
            results[i] = out[row]
    return results
