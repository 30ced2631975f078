"""Decoding steps replayed from CUDA graphs.

Decoding a small model on a GPU is bound by the host: each of the ~18 operations per decoder layer costs a
launch and its Python and dispatcher time, whatever its size. A CUDA graph replays a whole step in one launch,
but it fixes the shapes and addresses of everything it touches. So the state here has fixed room from the
start (rows for every beam, positions for the longest output), writes each token at a position held on the
device, and keeps rows whose sentence finished computing, unread: every step after the first has the same
shapes, and one graph serves them all. The search functions do not change: they see a step function and a
state with `reorder`, as before.

Without CUDA (or with capture=False) the same fixed-shape step runs eagerly: that is how it is tested on CPU,
where it is slower than DecodeState (attention reads every position, written or not).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .cache import KV, DecodeState
from .model import DecoderOnly, EncoderDecoder


class StaticKVCache:
    """One layer's view of StaticDecodeState's key/value room: written at the position the state holds on the
    device; attention reads every position, and the state's mask hides the ones not written yet."""

    def __init__(self, state: StaticDecodeState, layer: int):
        self.state, self.layer = state, layer

    def append(self, kv: Tensor) -> KV:
        """kv: (N, 2, H, T, head_dim), written at positions position .. position + T - 1 of rows 0..N-1.
        Returns those rows' keys and values at every position."""
        n, t = kv.size(0), kv.size(3)
        room = self.state.kv_room(kv)[self.layer, :n]
        where = self.state.position if t == 1 else self.state.position + torch.arange(t, device=kv.device)
        room.index_copy_(3, where, kv)
        return room[:, 0], room[:, 1]


class StaticDecodeState(DecodeState):
    """A DecodeState of fixed shapes: room for `rows` rows (sentences x beams) and `positions` positions from the
    start, the next position on the device, and every layer's keys and values in one tensor, so that reordering
    them is two operations whatever the number of layers, with no host sync (DecodeState finds the rows that
    move, a sync, and copies only those, layer by layer). Steps after the first run on all `rows` rows, those of
    finished sentences included (see fixed_shape)."""

    sparse_reorder = False

    def __init__(self, model: EncoderDecoder | DecoderOnly, state: DecodeState, rows: int, positions: int):
        if state.length:
            raise ValueError("a StaticDecodeState starts from a fresh DecodeState (model.start)")
        device = next(model.parameters()).device
        self.rows, self.n_positions = rows, positions
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.keys = torch.arange(positions, device=device)
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)  # a fixed-shape step's input
        self._kv_room: Tensor | None = None  # (layers, rows, 2, H, positions, head_dim), made at the first append
        # The memory's cross-attention keys and values, (layers, 2, sentences, H, S, head_dim), computed here once.
        self.memory_kv = None if state.memory is None else \
            torch.stack([torch.stack(block.cross_attn.memory_kv(state.memory)) for block in model.decoder.blocks])
        self.sentences = 0 if state.memory is None else state.memory.size(0)  # in use, the first of memory_kv's
        pad_len = None
        if state.pad_len is not None:
            pad_len = state.pad_len.new_zeros(rows)
            pad_len[:state.pad_len.numel()] = state.pad_len
        kv = [(StaticKVCache(self, i), None if self.memory_kv is None else tuple(self.memory_kv[i]))
              for i in range(len(state.kv))]
        super().__init__(kv=kv, memory=None, memory_mask=state.memory_mask, pad_len=pad_len, group=state.group)

    def kv_room(self, like: Tensor) -> Tensor:
        if self._kv_room is None:
            self._kv_room = like.new_zeros(len(self.kv), self.rows, 2, like.size(2), self.n_positions, like.size(4))
        return self._kv_room

    def fixed_shape(self, new: Tensor) -> bool:
        """Whether a step feeding `new` (N, T) runs on all rows: one token each, after the first step (whose rows
        may be one per sentence, before beams fan out) or with every row in use from the start."""
        return new.size(1) == 1 and (self.length > 0 or new.size(0) == self.rows)

    def reorder(self, index: Tensor, group: int = 1, sentences: Sequence[int] | None = None) -> None:
        """As DecodeState.reorder, in place: rows past len(index) keep what they held. Copies the written positions
        of every row: on a GPU a few more bytes cost less than finding the rows that move."""
        n = index.numel()
        if n > self.rows:
            raise ValueError(f"a reorder to {n} rows exceeds the fixed room of {self.rows}")
        if self._kv_room is not None:
            written = self._kv_room[:, :, :, :, :self.length]
            written[:, :n] = written.index_select(1, index)
        if self.pad_len is not None:
            self.pad_len[:n] = self.pad_len.index_select(0, index)
        if self.memory_kv is not None and sentences != range(self.sentences):
            if sentences is None:
                sentences = index[::group] if self.group == 1 else index[::group] // self.group
            else:
                sentences = torch.tensor(list(sentences), device=index.device)
            self.memory_kv[:, :, :sentences.numel()] = self.memory_kv.index_select(2, sentences)
            self.memory_mask[:sentences.numel()] = self.memory_mask.index_select(0, sentences)
            self.sentences = sentences.numel()
        self.group = group

    _reads_unwritten = True

    def _written(self, new: Tensor) -> Tensor:
        return self.position if new.size(1) == 1 else self.position + torch.arange(new.size(1), device=new.device)

    def _keys(self, new: Tensor) -> Tensor:
        return self.keys

    def advance(self, n_new: int) -> None:
        self.length += n_new
        self.position.add_(n_new)

    def truncate(self, length: int) -> None:
        raise NotImplementedError("a fixed-shape decoding state cannot forget positions (speculative decoding "
                                  "uses DecodeState)")


class GraphedStep:
    """A step function (tokens, state) -> logits over a StaticDecodeState. A step whose shapes are not the fixed
    ones (a prompt; a beam search's first step, one row per sentence) runs through model.step. Fixed-shape steps
    feed the new tokens into the state's input rows and compute every row; with capture, the first of them is
    captured as a CUDA graph and every later one replays it. One GraphedStep serves one state."""

    def __init__(self, model: EncoderDecoder | DecoderOnly, capture: bool):
        self.model, self.capture = model, capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None  # the graph's output, rewritten by each replay

    def __call__(self, tokens: Tensor, state: StaticDecodeState) -> Tensor:
        new = tokens[:, state.length:]
        if not state.fixed_shape(new):
            return self.model.step(tokens, state)
        state.tokens[:new.size(0)].copy_(new)
        if not self.capture:
            return self._step(state)[:new.size(0)]
        if self.graph is None:
            self._capture(state)
        self.graph.replay()
        state.length += 1  # the graph advanced state.position itself
        return self.logits[:new.size(0)]

    def _step(self, state: StaticDecodeState) -> Tensor:
        return self.model.logits(self.model.hidden(state.tokens, state)[:, -1])

    def _capture(self, state: StaticDecodeState) -> None:
        """Warm up on a side stream (lazy initialisation, such as that stream's cuBLAS workspace, must not happen
        during capture), then capture one step on it. The warm-up writes the same keys and values at the same
        position, so undoing its advance leaves the state as it was; the capture records kernels without running
        them. CUDAGraph's low-level calls rather than `torch.cuda.graph`, which empties the allocator's cache
        before each capture (one capture per batch here)."""
        length, position = state.length, state.position.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            self._step(state)
            state.position.copy_(position)
            state.length = length
            torch.cuda.synchronize()
            try:
                graph.capture_begin()
                try:
                    logits = self._step(state)
                finally:
                    graph.capture_end()
            except RuntimeError as error:
                raise RuntimeError(f"capturing a decoding step as a CUDA graph failed ({error}); decode without "
                                   "cuda_graphs (--cuda-graphs) instead") from error
            finally:
                state.length = length
        torch.cuda.current_stream().wait_stream(stream)
        self.graph, self.logits = graph, logits
