"""The state incremental decoding carries from step to step: per layer, a key/value cache that grows in place,
and per sentence the encoder memory's cross-attention entries. The caller owns a `DecodeState` and passes it to
the model's `step`; beam search reorders it, copying only the rows that move, and speculative decoding hides
rejected positions row by row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

KV = tuple[Tensor, Tensor]  # keys, values: (B, H, T, head_dim) each


def _copy_rows(t: Tensor, moved: Tensor, sources: Tensor) -> None:
    """In place, row moved[j] of t becomes what row sources[j] was."""
    t.index_copy_(0, moved, t.index_select(0, sources))


class KVCache:
    """One self-attention layer's keys and values while decoding, in one buffer with room to grow: keys of row i
    of the batch, position t at kv[i, 0, :, t], values at kv[i, 1, :, t]. Appending writes in place;
    concatenating would copy the whole cache into a fresh allocation every step (on CPU the copy and the new
    pages cost as much as attention itself). Keys and values share the buffer, so that appending or reordering
    both is one copy each (the projection computes them side by side). Rows lead: PyTorch's CPU index_select and
    index_copy_ along a later dimension were 10x slower."""

    def __init__(self) -> None:
        self.kv: Tensor | None = None  # (room for rows, 2, H, room for positions, head_dim)
        self.rows = 0  # rows in use
        self.length = 0  # positions in use

    def append(self, kv: Tensor) -> KV:
        """New positions' keys and values, (N, 2, H, T, head_dim), after the cached ones. Returns the keys and
        values of all positions."""
        n, end = kv.size(0), self.length + kv.size(3)
        if self.length and n != self.rows:
            raise ValueError(f"{n} rows appended to a cache of {self.rows}: reorder the decoding state first")
        if self.kv is None or n > self.kv.size(0) or end > self.kv.size(3):
            self._resize(kv, n, max(2 * end, 16))
        self.kv[:n, :, :, self.length:end] = kv
        self.rows, self.length = n, end
        return self.kv[:n, 0, :, :end], self.kv[:n, 1, :, :end]

    def reorder(self, index: Tensor, moved: Tensor, sources: Tensor) -> None:
        """Row i becomes what row index[i] was; `moved` holds the i where index[i] != i, the only rows copied,
        and `sources` their index[i]."""
        if self.kv is None:
            return
        if index.numel() > self.kv.size(0):  # more rows than there is room for (beams fanning out)
            self._resize(self.kv, index.numel(), self.kv.size(3), index)
        elif moved.numel():
            _copy_rows(self.kv[:, :, :, :self.length], moved, sources)
        self.rows = index.numel()

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def _resize(self, like: Tensor, rows: int, positions: int, index: Tensor | None = None) -> None:
        """A new buffer with room for rows x positions, holding the cached entries (or their rows `index`)."""
        old, self.kv = self.kv, like.new_empty(rows, 2, like.size(2), positions, like.size(4))
        if old is None:
            return
        cached = old[:self.rows, :, :, :self.length]
        if index is None:
            self.kv[:self.rows, :, :, :self.length] = cached
        else:
            torch.index_select(cached, 0, index, out=self.kv[:index.numel(), :, :, :self.length])


def _moved(index: Tensor) -> Tensor:
    """The i where index[i] != i."""
    return (index != torch.arange(index.numel(), device=index.device)).nonzero().squeeze(1)


def _take_rows(t: Tensor, index: Tensor, moved: Tensor, sources: Tensor) -> Tensor:
    """t.index_select(0, index), written over t's own first rows where it fits (the result is a view of t);
    `moved` holds the i where index[i] != i, the only rows copied, and `sources` their index[i]."""
    if index.numel() > t.size(0):
        return t.index_select(0, index)
    if moved.numel():
        _copy_rows(t, moved, sources)
    return t if index.numel() == t.size(0) else t[:index.numel()]


@dataclass
class DecodeState:
    """What incremental decoding carries from step to step; owned and passed in by the caller.

    kv[i] = (the self-attention KVCache of layer i, the cross-attention keys/values of the memory). The caches
    are per row. The memory and its cross-attention entries are per sentence, shared by the sentence's `group`
    consecutive rows (its beams), so reordering beams never copies them. `pad_len` counts left padding per row
    (decoder-only prompts of unequal length): those positions are never attended to, and positions count from
    the first real token. `rejected` marks, per row, cache positions that hold drafted tokens the model did not
    accept (self-speculative decoding: rows accept different numbers): they are never attended to and do not
    count as positions, so each row reads as if only its accepted tokens had been fed."""

    kv: list[tuple[KVCache, KV | None]]
    memory: Tensor | None = None  # (B, S, C); dropped once its keys/values are cached
    memory_mask: Tensor | None = None  # (B, 1, 1, S) True at real source tokens
    pad_len: Tensor | None = None  # (N,)
    rejected: Tensor | None = None  # (N, length) bool
    fewest_rejected: int = 0  # the least rejected positions of any row (bounds the positions used, on the host)
    # Speculation feeds proposals past a row's output limit, which are never kept: their positions may be capped.
    position_cap: int | None = None
    length: int = 0  # positions fed so far
    group: int = 1  # rows per sentence
    reuse_logits: bool = False  # step writes its logits into `logits`, over the previous step's (on CPU)
    logits: Tensor | None = None
    sparse_reorder = True  # reorders copy only the rows that move (for beam search: see decoding.py)

    def reorder(self, index: Tensor, group: int = 1, sentences: Sequence[int] | None = None) -> None:
        """Row i becomes what row index[i] was (beam reordering, expanding to beams, dropping finished rows).
        Afterwards every `group` consecutive rows belong to one sentence; each group must come from rows of
        one sentence, `sentences[g]` for group g where the caller knows it (a range: none moved; None: read off
        index). Entries are rewritten in place where they fit, and only the rows with index[i] != i are copied:
        a search that keeps each beam's continuation in the beam's own row copies few."""
        moved = _moved(index)
        sources = index[moved]
        for cache, _ in self.kv:
            cache.reorder(index, moved, sources)
        self.pad_len = None if self.pad_len is None else self.pad_len.index_select(0, index)
        if self.rejected is not None:
            self.rejected = self.rejected.index_select(0, index)
            self.fewest_rejected = int(self.rejected.sum(dim=1).min()) if index.numel() else 0
        per_sentence = self.memory_mask if self.memory_mask is not None else self.memory
        if per_sentence is not None and sentences != range(per_sentence.size(0)):
            sentences = index[::group] // self.group if sentences is None else \
                torch.tensor(list(sentences), device=index.device)  # the sentence each new group comes from
            moved = _moved(sentences)
            sources = sentences[moved]

            def per_sentence(t):
                return None if t is None else _take_rows(t, sentences, moved, sources)
            self.kv = [(cache, None if c is None else (per_sentence(c[0]), per_sentence(c[1]))) for cache, c in self.kv]
            self.memory, self.memory_mask = per_sentence(self.memory), per_sentence(self.memory_mask)
        self.group = group

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (speculative decoding of one sentence rejects drafted tokens this way)."""
        for cache, _ in self.kv:
            cache.truncate(length)
        self.length = length
        if self.rejected is not None:
            self.rejected = self.rejected[:, :length]

    def reject(self, kept: Sequence[int], fed: int) -> None:
        """Of the last `fed` positions fed, row i keeps its first kept[i] and hides the rest (speculative decoding:
        rows keep different numbers of drafted tokens). Positions no row keeps are forgotten, so that one sentence
        (or rows that keep alike) carries no hidden positions and needs no mask for them."""
        longest, start = max(kept), self.length - fed
        self.truncate(start + longest)
        if self.rejected is None and min(kept) == longest:
            return
        device = self.kv[0][0].kv.device
        hide = torch.arange(longest, device=device) >= torch.tensor(kept, device=device)[:, None]
        before = hide.new_zeros(len(kept), start) if self.rejected is None else \
            torch.nn.functional.pad(self.rejected, (0, start - self.rejected.size(1)), value=False)
        self.rejected = torch.cat([before, hide], dim=1)
        self.fewest_rejected = int(self.rejected.sum(dim=1).min())

    def end(self, new: Tensor) -> int:
        """An upper bound of the positions used once the new tokens are in (checked against max_positions)."""
        end = self.length + new.size(1) - self.fewest_rejected
        return end if self.position_cap is None else min(end, self.position_cap + 1)

    def _written(self, new: Tensor) -> Tensor:
        """Where the new tokens (N, T) go in the cache: (T,)."""
        return torch.arange(self.length, self.length + new.size(1), device=new.device)

    def _keys(self, new: Tensor) -> Tensor:
        """The cache positions that attention reads once the new tokens are in: (S,)."""
        return torch.arange(self.length + new.size(1), device=new.device)

    _reads_unwritten = False  # whether attention reads positions not written yet (which the mask must hide)

    def positions(self, new: Tensor) -> Tensor:
        """Positions of the new tokens (N, T) after those the state holds: (T,), or (N, T) after left padding."""
        positions = self._written(new)
        if self.pad_len is None and self.rejected is None:
            return positions if self.position_cap is None else positions.clamp(max=self.position_cap)
        skipped = 0
        if self.pad_len is not None:
            skipped = self.pad_len[:new.size(0), None]
        if self.rejected is not None:
            skipped = skipped + self.rejected.sum(dim=1, keepdim=True)
        return (positions[None, :] - skipped).clamp(min=0, max=self.position_cap)

    def attention_mask(self, new: Tensor, bidirectional: bool = False) -> Tensor | None:
        """Self-attention mask for the new tokens (N, T) over the cache, (N or 1, 1, T or 1, S): the written
        positions up to each query's own (a prefix LM's prompt, bidirectional: all of itself), none of the left
        padding. None where nothing needs hiding."""
        if (new.size(1) == 1 or bidirectional) and self.pad_len is None and self.rejected is None \
                and not self._reads_unwritten:
            return None  # one new position may see every cached one; a bidirectional prompt sees all of itself
        key, query = self._keys(new), self._written(new)
        mask = (key <= (query[-1:, None] if bidirectional else query[:, None]))[None, None]
        if self.pad_len is not None:
            mask = mask & (key >= self.pad_len[:new.size(0), None])[:, None, None, :]
        if self.rejected is not None:  # positions fed after the last reject are not rejected (yet)
            accepted = torch.nn.functional.pad(~self.rejected[:new.size(0)], (0, key.numel() - self.rejected.size(1)),
                                               value=True)
            mask = mask & accepted[:, None, None, :]
        return mask

    def advance(self, n_new: int) -> None:
        self.length += n_new
