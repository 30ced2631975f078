"""Batches from a store's length arrays: a seeded plan per epoch (sentences of similar length together, each
batch within max_tokens, padding included), shared out among ranks, resumable mid-epoch; and collation of a
batch's sentences into padded tensors, read from the store as the batch needs them."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .data import BOS_ID, EOS_ID, PAD_ID, DataError
from .store import OnDisk, Pairs, runs
from .subword import SubwordSampling


def token_batches(src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int, order: np.ndarray) -> list[np.ndarray]:
    """Cut `order` into consecutive batches, each the longest run whose padded size (batch size x longest side)
    fits max_tokens; a sentence longer than max_tokens gets a batch of its own. A loop over batches, not
    sentences: each batch's size comes from a running maximum over a window."""
    lengths = np.maximum(src_lens, tgt_lens)[order]
    batches, start, n = [], 0, len(order)
    while start < n:
        window = lengths[start:start + max_tokens // int(lengths[start]) + 1]  # no batch holds more
        padded = np.maximum.accumulate(window) * np.arange(1, len(window) + 1)
        count = max(1, int(np.searchsorted(padded, max_tokens, side="right")))
        batches.append(order[start:start + count])
        start += count
    return batches


class ResumableBatches:
    """An iterable of batches for Lightning, shuffled per epoch under a seed, resumable mid-epoch.

    Each batch carries its `position`, (epoch, index). The epoch advances when a pass is exhausted (not when
    Lightning says so: a run stopped by max_steps ends Lightning's epoch early). A run killed mid-epoch saves
    the position after the last batch it trained; `resume_at` set to it makes the next pass continue from
    there (the batches themselves are a pure function of seed and epoch). Subclasses say what the batches
    of an epoch are (`plan`) and how one is built (`collate`)."""

    def __init__(self, shuffle: bool, seed: int, rank: int, world: int):
        self.shuffle, self.seed, self.rank, self.world = shuffle, seed, rank, world
        self.epoch = 0
        self.resume_at: tuple[int, int] | None = None
        self._planned: tuple[int, list[np.ndarray]] | None = None

    def plan(self, epoch: int) -> list[np.ndarray]:
        raise NotImplementedError

    def collate(self, indices: np.ndarray, position: tuple[int, int] | None = None) -> dict[str, Any]:
        """The batch of sentences (or blocks) `indices`; `position` is its (epoch, index) in training."""
        raise NotImplementedError

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of an epoch: every world-th of the plan, trimmed so that every rank gets as many.
        Kept for the epoch (Lightning asks for the length, then iterates)."""
        if self._planned is None or self._planned[0] != epoch:
            batches = self.plan(epoch)
            usable = len(batches) - len(batches) % self.world if self.shuffle else len(batches)
            self._planned = (epoch, batches[:usable][self.rank::self.world])
        return self._planned[1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iterate()

    def iterate(self, share: int = 0, shares: int = 1) -> Iterator[dict[str, Any]]:
        """One pass; with shares > 1, only every shares-th batch from the pass's start + share is collated (a
        DataLoader worker's part: the workers' batches, taken in turn, are the pass in order)."""
        start = 0
        if self.resume_at is not None:
            self.epoch, start = self.resume_at
            self.resume_at = None
        epoch = self.epoch
        batches = self.batches(epoch)
        if start >= len(batches):  # the run stopped exactly at the end of a pass
            epoch, start, batches = epoch + 1, 0, self.batches(epoch + 1)
        self.epoch = epoch
        mine = range(start + share, len(batches), shares)
        for k, index in enumerate(mine):
            batch = self.collate(batches[index], (epoch, index))
            batch["position"] = (epoch, index)
            if k == len(mine) - 1:
                self._end_pass(epoch)  # before the last batch goes out: a consumer that knows the length
            yield batch                # (Lightning does) never asks for more, so code after the loop would not run
        if not mine:
            self._end_pass(epoch)

    def _end_pass(self, epoch: int) -> None:
        if self.shuffle:
            self.epoch = epoch + 1


class _Share(torch.utils.data.IterableDataset):
    """A DataLoader worker's part of the batches (see ResumableBatches.iterate)."""

    def __init__(self, batches: ResumableBatches):
        self.batches = batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        return self.batches.iterate(worker.id, worker.num_workers)


class Prefetched:
    """Batches collated in `workers` background processes while the model trains on the ones before, in the same
    order as without them; resumable as the batches are (the workers stay, so each keeps its place)."""

    def __init__(self, batches: ResumableBatches, workers: int):
        self.batches = batches
        self.loader = torch.utils.data.DataLoader(_Share(batches), batch_size=None, num_workers=workers,
                                                  persistent_workers=True, prefetch_factor=4)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            epoch, index = batch["position"] = tuple(batch["position"])  # (the DataLoader hands tuples over as lists)
            self.batches.epoch = epoch  # this process's copy follows the workers'
            if index == len(self.batches.batches(epoch)) - 1:
                self.batches._end_pass(epoch)
            yield batch


def _sentences(side, indices: np.ndarray) -> list[list[int]]:
    """Sentences `indices` of a store side as lists, read in one go."""
    ends = np.cumsum(side.lengths[indices].astype(np.int64))
    return [part.tolist() for part in np.split(side.tokens(indices).astype(np.int64), ends[:-1])]


class TokenBatches(ResumableBatches):
    """Padded translation batches: {"src", "tgt_in", "tgt_out", "ntokens", "position"}, and "index" (each pair's
    corpus line) when evaluating.

    Training (shuffle=True): a seeded permutation, then a stable sort by length, so that sentences of
    similar length share a batch with random ties; the batch order is shuffled again per epoch. With
    `sampling` (training only), the sentences of each batch are segmented anew (SubwordSampling). The plan
    then counts each sentence as long as sampling makes sentences on average (SubwordSampling.growth), and a
    sentence whose sampled segmentation would not fit the batch's width (max_tokens / batch size) keeps its
    stored one: a batch stays within max_tokens, padding included, as without sampling.
    Evaluation (shuffle=False): sorted by length, the same batches every time; `index` restores line order."""

    def __init__(self, data: Pairs, max_tokens: int, shuffle: bool, seed: int = 1, rank: int = 0, world: int = 1,
                 joint: bool = False, sampling: SubwordSampling | None = None):
        super().__init__(shuffle, seed, rank, world)
        if sampling is not None and not shuffle:
            raise ValueError("subword sampling is for training batches; evaluation keeps one segmentation")
        self.data, self.max_tokens, self.joint, self.sampling = data, max_tokens, joint, sampling
        growth = 1.0 if sampling is None else sampling.growth((data.src, data.tgt))
        self.src_lens = np.ceil(data.src.lengths * growth).astype(np.int32) + 1  # + EOS
        self.tgt_lens = np.ceil(data.tgt.lengths * growth).astype(np.int32) + 1  # + BOS (input) or EOS (output)
        if joint:  # decoder-only translation: one sequence BOS source EOS target (EOS)
            self.src_lens = self.tgt_lens = self.src_lens + self.tgt_lens

    def plan(self, epoch: int) -> list[np.ndarray]:
        if not self.shuffle:
            order = np.lexsort((self.tgt_lens, self.src_lens))
            return token_batches(self.src_lens, self.tgt_lens, self.max_tokens, order)
        rng = np.random.default_rng([self.seed, epoch])
        order = np.arange(len(self.src_lens), dtype=np.int32)  # rng.permutation's order, in half the memory
        rng.shuffle(order)
        # By target length, then source length; stable, so ties stay in random order. (One integer key: half the
        # time of np.lexsort on the two arrays, the same order.)
        key = self.tgt_lens[order].astype(np.uint32) << 16 | self.src_lens[order].astype(np.uint32) \
            if max(self.tgt_lens.max(), self.src_lens.max()) < 2 ** 16 else \
            self.tgt_lens[order].astype(np.int64) << 32 | self.src_lens[order]
        order = order[np.argsort(key, kind="stable")]
        batches = token_batches(self.src_lens, self.tgt_lens, self.max_tokens, order)
        rng.shuffle(batches)
        return batches

    def collate(self, indices: np.ndarray, position: tuple[int, int] | None = None) -> dict[str, Any]:
        data = self.data
        if self.sampling is not None:  # this batch's pairs, segmented anew
            if position is None:
                raise ValueError("a sampled batch needs its position (epoch, index)")
            src, tgt = _sentences(data.src, indices), _sentences(data.tgt, indices)
            width = self.max_tokens // len(indices)  # what the plan allows each sequence, padding included
            position = (*position, self.rank)  # the ranks' batches at one position draw apart
            if self.joint:  # one sequence holds BOS, source, EOS, target: the two sides share the width
                src = self.sampling.resegment(src, position, 0, [width - 2 - len(t) for t in tgt])
                tgt = self.sampling.resegment(tgt, position, 1, [width - 2 - len(s) for s in src])
            else:  # EOS (source), BOS or EOS (target)
                src = self.sampling.resegment(src, position, 0, width - 1)
                tgt = self.sampling.resegment(tgt, position, 1, width - 1)
            data = Pairs.of(src, tgt)
            indices = np.arange(len(indices))
        src, tgt = data.src, data.tgt
        ls, lt = src.lengths[indices].astype(np.int64), tgt.lengths[indices].astype(np.int64)
        rows = np.arange(len(indices))
        if self.joint:
            return self._joint(data, indices, ls, lt)
        src_ids = np.full((len(indices), int(ls.max()) + 1), PAD_ID, dtype=np.int64)
        src.place(indices, src_ids, 0)
        src_ids[rows, ls] = EOS_ID
        tgt_in = np.full((len(indices), int(lt.max()) + 1), PAD_ID, dtype=np.int64)
        tgt.place(indices, tgt_in, 1)
        tgt_in[:, 0] = BOS_ID
        tgt_out = np.full_like(tgt_in, PAD_ID)
        tgt.place(indices, tgt_out, 0)
        tgt_out[rows, lt] = EOS_ID
        return self._lines({"src": torch.from_numpy(src_ids), "tgt_in": torch.from_numpy(tgt_in),
                            "tgt_out": torch.from_numpy(tgt_out), "ntokens": int(lt.sum() + len(indices))}, indices)

    def _lines(self, batch: dict[str, Any], indices: np.ndarray) -> dict[str, Any]:
        """Evaluation batches carry each pair's corpus line (`index`), which puts translations back in order;
        training needs none (one read less per pair)."""
        if not self.shuffle:
            batch["index"] = torch.from_numpy(self.data.lines(indices))
        return batch

    def _joint(self, data: Pairs, indices: np.ndarray, ls: np.ndarray, lt: np.ndarray) -> dict[str, Any]:
        """Decoder-only translation: inputs BOS source EOS target, predicting the target and its EOS only
        (EOS separates the two sides). `prefix_len` covers BOS, source and separator; `src` stays for decoding."""
        rows = np.arange(len(indices))
        src_ids = np.full((len(indices), int(ls.max()) + 1), PAD_ID, dtype=np.int64)
        data.src.place(indices, src_ids, 0)
        src_ids[rows, ls] = EOS_ID
        width = int((ls + lt).max()) + 2
        tokens_in = np.full((len(indices), width), PAD_ID, dtype=np.int64)
        tokens_in[:, 0] = BOS_ID
        data.src.place(indices, tokens_in, 1)
        tokens_in[rows, ls + 1] = EOS_ID
        data.tgt.place(indices, tokens_in, ls + 2)
        tokens_out = np.full_like(tokens_in, PAD_ID)
        data.tgt.place(indices, tokens_out, ls + 1)
        tokens_out[rows, ls + lt + 1] = EOS_ID
        return self._lines({"src": torch.from_numpy(src_ids), "tgt_in": torch.from_numpy(tokens_in),
                            "tgt_out": torch.from_numpy(tokens_out), "prefix_len": torch.from_numpy(ls + 2),
                            "ntokens": int(lt.sum() + len(indices))}, indices)


class BlockBatches(ResumableBatches):
    """Batches of packed blocks for next-token prediction: {"tgt_in", "tgt_out", "ntokens", "position"}. Block i
    is stream[i * block_size : (i + 1) * block_size + 1] (inputs and next-token targets overlap by one); the
    ragged tail is left out."""

    def __init__(self, stream: np.ndarray | OnDisk, block_size: int, max_tokens: int, shuffle: bool, seed: int = 1,
                 rank: int = 0, world: int = 1):
        super().__init__(shuffle, seed, rank, world)
        self.stream, self.block_size = stream, block_size
        self.n_blocks = (len(stream) - 1) // block_size
        if self.n_blocks < 1:
            raise DataError(f"corpus of {len(stream)} tokens is shorter than one block of {block_size + 1}")
        self.per_batch = max(1, max_tokens // block_size)

    def plan(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks) if self.shuffle \
            else np.arange(self.n_blocks)
        return [order[i:i + self.per_batch] for i in range(0, len(order), self.per_batch)]

    def collate(self, indices: np.ndarray, position: tuple[int, int] | None = None) -> dict[str, Any]:
        starts = np.sort(indices) * self.block_size
        tokens = runs(self.stream, starts, np.full(len(starts), self.block_size + 1))
        rows = torch.from_numpy(tokens.astype(np.int64).reshape(len(starts), self.block_size + 1))
        return {"tgt_in": rows[:, :-1], "tgt_out": rows[:, 1:], "ntokens": int(rows[:, 1:].numel())}
