"""Subword regularization of training batches, seeded: BPE-dropout for BPE models, n-best sampling for unigram.

sentencepiece samples segmentations itself (enable_sampling), but its draws come from Abseil generators that
mix a per-process salt into any seed: the same seed gives other segmentations in another process, so a
DataLoader worker or a resumed run would train on other batches than an uninterrupted one. Hence the sampling
here, on numpy generators seeded by the batch's place: BPE-dropout is sentencepiece's BPE merge loop with each
merge skipped with probability alpha (as sentencepiece does it), and unigram sampling draws one of the nbest
segmentations that sentencepiece returns deterministically, with probability ~ P^alpha.
"""

from __future__ import annotations

import heapq
import re
from typing import Any, Sequence

import numpy as np

_WORD = re.compile("\u2581[^\u2581]*|[^\u2581]+")  # sentencepiece's words: each starts at a ▁ (a space)
_NORMAL, _USER_DEFINED, _BYTE = 1, 4, 6  # sentencepiece piece types


def bpe_dropout(word: str, score: dict[str, float], alpha: float, rng: np.random.Generator) -> list[str]:
    """BPE segmentation of one word: repeatedly merge the adjacent pair whose merged piece scores highest
    (leftmost first among equals), as sentencepiece's BPE model does; each merge taken off the agenda is skipped
    with probability alpha (sentencepiece's BPE-dropout). alpha 0 gives sentencepiece's own segmentation."""
    symbols: list[str | None] = list(word)
    prev, nxt = list(range(-1, len(symbols) - 1)), list(range(1, len(symbols) + 1))
    agenda: list[tuple[float, int, str]] = []

    def add(left: int, right: int) -> None:
        if left < 0 or right >= len(symbols):
            return
        merged = symbols[left] + symbols[right]
        if merged in score:
            heapq.heappush(agenda, (-score[merged], left, merged))

    for i in range(len(symbols) - 1):
        add(i, i + 1)
    while agenda:
        _, left, merged = heapq.heappop(agenda)
        right = nxt[left]
        if symbols[left] is None or right >= len(symbols) or symbols[left] + symbols[right] != merged:
            continue  # a stale entry: one of its symbols has merged since
        if alpha and rng.random() < alpha:
            continue
        symbols[left], symbols[right] = merged, None
        nxt[left] = nxt[right]
        if nxt[left] < len(symbols):
            prev[nxt[left]] = left
        add(prev[left], left)
        add(left, nxt[left])
    return [s for s in symbols if s is not None]


class SubwordSampling:
    """Each sentence of a training batch segmented anew, by a draw that depends on the run's seed and the
    batch's (epoch, index) alone, so a batch is the same whichever process collates it and after a resume. The
    store keeps the deterministic ids; decoding them gives the sentence back exactly (byte fallback), which is
    then segmented with sampling, so a store needs no text and any store works. A sampled segmentation longer
    than `max_len` keeps the deterministic one."""

    def __init__(self, model_file: str, alpha: float, nbest: int, seed: int, max_len: int):
        self.model_file, self.alpha, self.nbest, self.seed, self.max_len = str(model_file), alpha, nbest, seed, max_len
        self._sp: Any = None

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker loads the model anew
        return {"model_file": self.model_file, "alpha": self.alpha, "nbest": self.nbest, "seed": self.seed,
                "max_len": self.max_len, "_sp": None}

    def _load(self) -> None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(open(self.model_file, "rb").read())
        self._bpe = proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
        self._score = {p.piece: p.score for p in proto.pieces if p.type in (_NORMAL, _USER_DEFINED)}
        # A piece's id is its place in the model; characters outside the vocabulary fall back to byte pieces.
        self._id = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (_NORMAL, _USER_DEFINED)}
        byte = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == _BYTE}
        self._bytes = [byte[f"<0x{b:02X}>"] for b in range(256)]

    def _ids(self, pieces: list[str]) -> list[int]:
        """Ids of the pieces; a character outside the vocabulary as its UTF-8 bytes (byte fallback)."""
        ids = []
        for piece in pieces:
            i = self._id.get(piece)
            ids.extend([self._bytes[b] for b in piece.encode("utf-8")] if i is None else [i])
        return ids

    def sample(self, text: str, rng: np.random.Generator) -> list[int]:
        """One sampled segmentation of a text (ids)."""
        if self._bpe:
            normalized = self._sp.normalize(text)
            return self._ids([p for word in _WORD.findall(normalized)
                              for p in bpe_dropout(word, self._score, self.alpha, rng)])
        nbest = self._sp.nbest_encode_as_proto(text, nbest_size=self.nbest if self.nbest > 0 else 64).nbests
        if not nbest:
            return self._sp.encode(text)
        scores = np.array([n.score for n in nbest]) * self.alpha
        p = np.exp(scores - scores.max())
        return [piece.id for piece in nbest[rng.choice(len(nbest), p=p / p.sum())].pieces]

    def resegment(self, sentences: list[list[int]], position: tuple[int, ...], side: int,
                  max_len: int | Sequence[int] | None = None) -> list[list[int]]:
        """The sentences segmented anew, by a draw that depends on the seed, position and side alone; those that
        come out longer than max_len (one for all or one per sentence; at most self.max_len) keep their
        segmentation."""
        if self._sp is None:
            self._load()
        rng = np.random.default_rng([self.seed, *position, side])
        sampled = [self.sample(text, rng) for text in self._sp.decode(sentences)]
        limits = [max_len] * len(sentences) if max_len is None or isinstance(max_len, int) else max_len
        return [new if 0 < len(new) <= min(self.max_len, self.max_len if limit is None else limit) else list(old)
                for new, old, limit in zip(sampled, sentences, limits)]

    def growth(self, sides: Sequence[Any], sample: int = 2000) -> float:
        """How much longer sampled segmentations are than the stored ones: the ratio of token counts over a
        seeded sample of sentences of each side (store Sides; about 1.4 for BPE-dropout 0.1 with 8000 pieces),
        at least 1."""
        rng = np.random.default_rng(self.seed)
        indices = np.sort(rng.choice(len(sides[0]), min(sample, len(sides[0])), replace=False))
        stored = sampled = 0
        for side, sentences in enumerate(sides):
            old = [sentences[i].tolist() for i in indices]
            stored += sum(map(len, old))
            sampled += sum(map(len, self.resegment(old, (0, 0), side + 2, max_len=10 ** 9)))  # draws of its own
        return max(1.0, sampled / max(stored, 1))
