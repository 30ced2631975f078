"""The line contract of translate and generate: read lines (UTF-8, split on newlines only, bad bytes named),
translate them in order, and write exactly one line per input line, a file only once complete."""

from __future__ import annotations

import contextlib
import logging
import sys
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


def translate_lines(model, tokenizer, lines: list[str], options, mode: str = "beam", nbest: int = 1,
                    sampling: dict | None = None, generator=None, draft=None,
                    draft_k: int = 4) -> tuple[list[list[str]], int]:
    """Translate raw lines: empty or whitespace-only lines give empty output without touching the model;
    sources longer than the model's positions are truncated. Returns, per line, `nbest` translations,
    and how many lines were truncated. With a `draft` model: speculative greedy decoding or sampling."""
    from .inference import source_limit, speculative_ids, translate_ids

    limit = source_limit(model)
    texts = [line.strip() for line in lines]
    todo = [i for i, text in enumerate(texts) if text]
    ids = tokenizer.encode([texts[i] for i in todo])
    truncated = sum(len(x) > limit for x in ids)
    if draft is not None:
        found, rate = speculative_ids(model, draft, [x[:limit] for x in ids], options, k=draft_k, sampling=sampling,
                                      generator=generator)
        outputs = [[tokens] for tokens in found]
        log.debug("speculative decoding: %.1f%% of draft tokens accepted", 100 * rate)
    else:
        outputs = translate_ids(model, [x[:limit] for x in ids], options, mode=mode, nbest=nbest, sampling=sampling,
                                generator=generator)
    results: list[list[str]] = [[""] * nbest for _ in lines]
    for i, hyps in zip(todo, outputs):
        results[i] = [one_line(t) for t in tokenizer.decode(hyps)]
    return results, truncated
