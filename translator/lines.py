"""The line contract of translate and generate: read lines (UTF-8, split on newlines only, bad bytes named),
translate them in order, and write exactly one line per input line, a file only once complete."""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, TextIO

log = logging.getLogger("translator")


def read_input(path: str | None) -> Iterator[str]:
    """Lines of a UTF-8 file or stdin, split on '\\n' only (never on the other characters Python's splitlines
    treats as breaks), with a clear error naming the line on bad bytes. A regular file is checked whole before
    its first line is given out, so a bad byte near its end does not throw away hours of translating; a pipe
    (stdin, /dev/stdin, <(...)) can be read only once, so it is checked as it streams."""
    path = None if path == "-" else path
    if path and Path(path).is_file():
        for _ in decoded_lines(path, "; nothing was translated"):
            pass
        yield from decoded_lines(path, "")
    else:
        yield from decoded_lines(path, "; stopped at this line")


def decoded_lines(path: str | None, consequence: str) -> Iterator[str]:
    stream = open(path, "rb") if path else sys.stdin.buffer
    try:
        for number, raw in enumerate(stream, 1):
            try:
                yield raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path or '<stdin>'}:{number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                                 f"column {e.start + 1}){consequence}") from None
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    if size < 1:
        raise ValueError(f"--chunk-lines must be positive (got {size})")
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextlib.contextmanager
def output(path: str | None) -> Iterator[TextIO]:
    """stdout; a file, written under a temporary name and renamed when complete (never half-written); or
    something that is not a plain file (/dev/stdout, a pipe, a symlink), written straight through: renaming over
    it would replace the device or link itself."""
    if not path or path == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    target = Path(path)
    if target.is_symlink() or (target.exists() and not target.is_file()):
        with open(target, "w", encoding="utf-8", newline="\n") as stream:
            yield stream
        return
    from .data import atomic_file

    target.parent.mkdir(parents=True, exist_ok=True)  # as average and export do for their outputs
    with atomic_file(target) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as stream:
        yield stream


def one_line(text: str) -> str:
    # Byte-fallback pieces can decode to line breaks; a translation must stay on its line.
    return text.replace("\r", " ").replace("\n", " ")


@dataclass
class Translations:
    texts: list[list[str]]  # per line, its n-best translations
    scores: list[list[float]]  # their scores (beam search's; nan for greedy, sampling and speculative decoding)
    alignments: list[str] | None  # per line, source-target word links in the Pharaoh format, when asked for
    truncated: int  # lines longer than the model reads, truncated


def translate_lines(model, tokenizer, lines: list[str], options, mode: str = "beam", nbest: int = 1,
                    sampling: dict | None = None, generator=None, draft=None, draft_k: int | None = None,
                    prefixes: list[str] | None = None, alignment_layer: int | None = None,
                    speculate_heads: bool = False) -> Translations:
    """Translate raw lines: empty or whitespace-only lines give empty output without touching the model (with a
    target prefix: the prefix); sources longer than the model's positions are truncated. With a `draft` model,
    or speculate_heads (the model's own draft heads): speculative greedy decoding or sampling, with draft_k tokens
    proposed per pass (default: 4 from a draft model, one from each of the model's heads). `prefixes`: per
    line, text the translation must start with ('': none). `alignment_layer`: also link words, from that
    decoder layer's cross-attention (of the first model of an ensemble)."""
    from .inference import Ensemble, self_speculative_ids, source_limit, speculative_ids, translate_hypotheses

    limit = source_limit(model)
    texts = [line.strip() for line in lines]
    prefix_texts = [p.strip() for p in prefixes] if prefixes is not None else [""] * len(lines)
    todo = [i for i, text in enumerate(texts) if text]
    ids = tokenizer.encode([texts[i] for i in todo])
    truncated = sum(len(x) > limit for x in ids)
    ids = [x[:limit] for x in ids]
    prefix_ids = tokenizer.encode([prefix_texts[i] for i in todo]) if prefixes is not None else None
    if speculate_heads:
        if prefixes is not None:
            raise ValueError("speculative decoding does not take target prefixes")
        found, stats = self_speculative_ids(model, ids, options, sampling=sampling, generator=generator, k=draft_k)
        hypotheses = [[(tokens, float("nan"))] for tokens in found]
        log.debug("self-speculative decoding: %.2f tokens per pass, %.1f%% of proposals accepted",
                  stats.tokens_per_pass, 100 * stats.accepted / max(stats.proposed, 1))
    elif draft is not None:
        if prefixes is not None:
            raise ValueError("speculative decoding (--draft) does not take target prefixes")
        found, rate = speculative_ids(model, draft, ids, options, k=4 if draft_k is None else draft_k,
                                      sampling=sampling, generator=generator)
        hypotheses = [[(tokens, float("nan"))] for tokens in found]
        log.debug("speculative decoding: %.1f%% of draft tokens accepted", 100 * rate)
    elif options.mbr and mode == "beam":  # beam search's candidates, reordered by expected utility
        from .mbr import mbr_order

        candidates = max(options.mbr, nbest)
        wide = replace(options, beam=candidates)
        found = translate_hypotheses(model, ids, wide, mode="beam", nbest=candidates, prefixes=prefix_ids)
        hypotheses = []
        for hyps in found:
            texts = [one_line(t) for t in tokenizer.decode([h.tokens for h in hyps])]
            scores = [h.score for h in hyps] if options.mbr_weights == "model" else None
            order = mbr_order(texts, options.mbr_utility, scores)
            hypotheses.append([(hyps[i].tokens, hyps[i].score) for i in order[:nbest]])
    else:
        found = translate_hypotheses(model, ids, options, mode=mode, nbest=nbest, sampling=sampling,
                                     generator=generator, prefixes=prefix_ids)
        hypotheses = [[(h.tokens, h.score) for h in hyps] for hyps in found]
    results = [[prefix_texts[i]] * nbest for i in range(len(lines))]
    scores = [[float("nan")] * nbest for _ in lines]
    for i, hyps in zip(todo, hypotheses):
        results[i] = [one_line(t) for t in tokenizer.decode([tokens for tokens, _ in hyps])]
        scores[i] = [score for _, score in hyps]
    alignments = None
    if alignment_layer is not None:
        from .alignment import cross_attention, pharaoh, token_links

        first = model.models[0] if isinstance(model, Ensemble) else model
        best = [hyps[0][0] for hyps in hypotheses]
        weights = cross_attention(first, ids, best, layer=alignment_layer)
        alignments = [""] * len(lines)
        for i, source, output, w in zip(todo, ids, best, weights):
            alignments[i] = pharaoh(token_links(w), tokenizer.sp.id_to_piece(source), tokenizer.sp.id_to_piece(output))
    return Translations(results, scores, alignments, truncated)
