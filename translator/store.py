"""The prepared token store: corpora tokenized once, read in place by every process that trains on them.

`prepare` reads a recipe's corpora as streams, trains the sentencepiece model on a bounded, seeded sample,
tokenizes chunk by chunk with sentencepiece's threads, applies the training filters, and writes per split and
side the token ids back to back with their offsets and lengths; the manifest comes last. `open_store`
reads it with positioned reads: a process holds only the batch it reads, and the ranks of a run share the
files through the page cache.
Batch plans come from the length arrays alone (`batching.py`; fairseq's indexed datasets work the same way). No library
does this for parallel text with our batching (fairseq's is part of fairseq; `datasets` keeps Arrow rows,
not a token stream), hence the code here.

A store directory:
  manifest.json           what was prepared from what; written last, so a store without it is incomplete
  spm.model               the sentencepiece model
  {split}.{side}.ids      token ids back to back (uint16 when the vocabulary fits, else uint32); side src/tgt,
                          or text for a language model, whose lines each end with EOS (the packed stream)
  {split}.{side}.offsets  int64, one per pair and one past the end
  {split}.{side}.lengths  tokens per pair (uint16, or uint32 for longer sentences)
  {split}.index           int64: the corpus line of each pair kept
  valid.references.json   the validation targets as text, for BLEU
"""

from __future__ import annotations

import hashlib
import itertools
import json
import contextlib
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .config import Recipe
from .data import (EOS_ID, DataError, Tokenizer, corpus_files, iter_pairs, iter_text_lines,
                   write_atomic)

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST, TOKENIZER, REFERENCES = "manifest.json", "spm.model", "valid.references.json"
_SUFFIXES = (".ids", ".offsets", ".lengths", ".index")


class StoreError(DataError):
    """A store that is missing, incomplete, or does not match the recipe or tokenizer it is used with."""


# -- What a store is prepared from -------------------------------------------------------------------------------

def settings(recipe: Recipe) -> dict[str, Any]:
    """Everything in a recipe that decides a store's contents. A store is used only with a recipe that gives
    the same settings (the model, schedule and decoding may differ)."""
    d, k = recipe.data, recipe.tokenizer
    joint = recipe.model.arch == "decoder_only" and d.task == "translation"  # source EOS target in one sequence
    limit = recipe.model.max_positions // 2 if joint else recipe.model.max_positions
    out = {"task": d.task, "tgt_lang": d.tgt_lang, "train": d.train, "valid": d.valid,
           "tokenizer": {"type": k.type, "vocab_size": k.vocab_size, "character_coverage": k.character_coverage,
                         "max_sentences": k.max_sentences}}
    if d.task == "translation":
        out.update(src_lang=d.src_lang, max_len=min(d.max_len, limit), max_ratio=d.max_ratio)
    return out


def _sources(recipe: Recipe, data_dir: str | os.PathLike | None, hub: bool = True) -> dict[str, list[dict[str, Any]]]:
    """The files each split reads, with sizes and modification times (none for a `datasets` corpus; with
    hub=False, a list's hub alternatives are not opened, so that checking a store costs no network)."""
    d = recipe.data
    langs = (d.src_lang, d.tgt_lang) if d.task == "translation" else (d.tgt_lang,)
    out = {}
    for split in ("train", "valid"):
        spec = getattr(d, split)
        if spec is not None:
            out[split] = [{"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                          for p in corpus_files(spec, langs, data_dir, hub)]
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _unchanged(now: dict[str, Any], then: dict[str, Any] | None) -> bool:
    """Whether a corpus file is the one a store was prepared from. A copy (another node, a restored backup, cp
    without -p) keeps the bytes but not the path or time, so a file of the same size at another path or time is
    compared by content; stores prepared before contents were recorded go by path and time alone."""
    if then is None or now["bytes"] != then["bytes"]:
        return False
    if now["path"] == then["path"] and now["mtime_ns"] == then["mtime_ns"]:
        return True
    return "sha256" in then and _sha256(Path(now["path"])) == then["sha256"]


# -- Preparing ----------------------------------------------------------------------------------------------------

def reservoir(items: Iterable[Any], k: int, seed: int = 1) -> tuple[list[Any], int]:
    """A uniform sample of k items from a stream of unknown length (Algorithm R), in stream order, and how many
    items there were. Memory: k items, whatever the stream's length."""
    rng = random.Random(seed)
    sample: list[tuple[int, Any]] = []
    n = 0
    for n, item in enumerate(items, 1):
        if n <= k:
            sample.append((n, item))
        else:
            j = rng.randrange(n)
            if j < k:
                sample[j] = (n, item)
    return [item for _, item in sorted(sample, key=lambda x: x[0])], n


class _SideWriter:
    """Appends tokenized sentences of one side to {split}.{side}.ids/.offsets/.lengths, holding nothing but the
    running total (lengths go to disk as uint32, narrowed to uint16 at the end when they fit)."""

    def __init__(self, directory: Path, split: str, side: str, id_dtype: np.dtype):
        self.stem = directory / f"{split}.{side}"
        self.files = {kind: open(f"{self.stem}.{kind}", "wb") for kind in ("ids", "offsets", "lengths")}
        self.id_dtype, self.total, self.longest = id_dtype, 0, 0
        self.files["offsets"].write(np.zeros(1, dtype=np.int64).tobytes())

    def write(self, sentences: list[list[int]]) -> None:
        lengths = np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))
        self.files["ids"].write(np.fromiter(itertools.chain.from_iterable(sentences), dtype=self.id_dtype,
                                            count=int(lengths.sum())).tobytes())
        self.files["offsets"].write((self.total + np.cumsum(lengths)).tobytes())
        self.files["lengths"].write(lengths.astype(np.uint32).tobytes())
        self.total += int(lengths.sum())
        self.longest = max(self.longest, int(lengths.max(initial=0)))

    def close(self) -> dict[str, Any]:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        dtype = np.uint16 if self.longest < 2 ** 16 else np.uint32
        if dtype == np.uint16:  # narrowed a block at a time
            wide, narrow = f"{self.stem}.lengths", f"{self.stem}.lengths.tmp"
            with open(wide, "rb") as src, open(narrow, "wb") as dst:
                while block := src.read(2 ** 22):
                    dst.write(np.frombuffer(block, dtype=np.uint32).astype(np.uint16).tobytes())
            os.replace(narrow, wide)
        return {"tokens": self.total, "length_dtype": np.dtype(dtype).name}


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _write_pairs(pairs: Iterable[tuple[str, str]], tokenizer: Tokenizer, directory: Path, split: str,
                 id_dtype: np.dtype, max_len: int | None, max_ratio: float, chunk: int, threads: int | None
                 ) -> dict[str, Any]:
    """Tokenize and write one split of a parallel corpus; with max_len (training), drop and count pairs whose
    side with its EOS/BOS exceeds max_len tokens, and with max_ratio > 0 those whose longer side has more than
    max_ratio times the tokens of the shorter (fairseq's and Moses clean-corpus-n's filters)."""
    sides = {side: _SideWriter(directory, split, side, id_dtype) for side in ("src", "tgt")}
    read = too_long = bad_ratio = 0
    with open(directory / f"{split}.index", "wb") as index:
        for lines in _chunks(pairs, chunk):
            src = tokenizer.encode([s for s, _ in lines], threads)
            tgt = tokenizer.encode([t for _, t in lines], threads)
            keep = np.arange(len(lines))
            if max_len is not None:
                ls, lt = (np.fromiter(map(len, x), dtype=np.int64, count=len(x)) for x in (src, tgt))
                long = (ls >= max_len) | (lt >= max_len)
                ratio = (np.maximum(ls, lt) > max_ratio * np.maximum(np.minimum(ls, lt), 1)) & ~long \
                    if max_ratio > 0 else np.zeros_like(long)
                too_long, bad_ratio = too_long + int(long.sum()), bad_ratio + int(ratio.sum())
                keep = np.flatnonzero(~long & ~ratio)
            sides["src"].write([src[i] for i in keep])
            sides["tgt"].write([tgt[i] for i in keep])
            index.write((read + keep).astype(np.int64).tobytes())
            read += len(lines)
    kept = read - too_long - bad_ratio
    info = {"read": read, "pairs": kept, "dropped_too_long": too_long, "dropped_ratio": bad_ratio,
            **{side: writer.close() for side, writer in sides.items()}}
    if max_len is not None and (too_long or bad_ratio):
        log.warning("%s: dropped %d of %d pairs longer than %d tokens%s", split, too_long, read, max_len,
                    f" and {bad_ratio} with a length ratio above {max_ratio}" if max_ratio > 0 else "")
    if kept == 0:
        raise DataError(f"{split}: no pair is shorter than max_len={max_len} tokens")
    return info


def _write_text(lines: Iterable[str], tokenizer: Tokenizer, directory: Path, split: str, id_dtype: np.dtype,
                chunk: int, threads: int | None) -> dict[str, Any]:
    """A language model's split: every line's tokens followed by EOS, one stream."""
    writer = _SideWriter(directory, split, "text", id_dtype)
    read = 0
    for batch in _chunks(lines, chunk):
        writer.write([ids + [EOS_ID] for ids in tokenizer.encode(batch, threads)])
        read += len(batch)
    return {"read": read, "lines": read, "text": writer.close()}


def _check_out(out: Path) -> None:
    """Only a store (or an empty directory) is replaced: never a run or other files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise StoreError(f"{out}: exists and is not a directory; choose another --out")
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in (MANIFEST, TOKENIZER, REFERENCES) and not p.name.endswith(_SUFFIXES))
    if foreign:
        raise StoreError(f"{out}: exists and is not a prepared store ({', '.join(foreign[:5])}); nothing was "
                         "written. Choose a new --out, or remove it first")


def prepare(recipe: Recipe, data_dir: str | os.PathLike | None, out: str | os.PathLike, tokenizer_file: str | None = None,
            chunk: int = 50_000, threads: int | None = None) -> dict[str, Any]:
    """Prepare the recipe's training (and validation) data into the store `out`. It is written into a temporary
    directory beside `out` and renamed into place when complete, so a killed prepare leaves no store that looks
    complete. Memory stays bounded by `chunk` pairs and the tokenizer's sample. Returns the manifest."""
    d = recipe.data
    if d.train is None:
        raise DataError("the recipe names no training corpus (data.train)")
    out = Path(out)
    _check_out(out)
    sources = _sources(recipe, data_dir)  # before any work: missing files are named at once
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        translation = d.task == "translation"
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER)
            sampled = None
        else:
            k = recipe.tokenizer
            if translation:  # max_sentences counts lines: half as many pairs; sources first, then targets
                pairs, n = reservoir(iter_pairs(d.train, d.src_lang, d.tgt_lang, data_dir), k.max_sentences // 2)
                sample = [s for s, _ in pairs] + [t for _, t in pairs]
            else:
                sample, n = reservoir(iter_text_lines(d.train, d.tgt_lang, data_dir), k.max_sentences)
            log.info("training a %d-piece %s sentencepiece model on %d of %d lines", k.vocab_size, k.type, len(sample),
                     2 * n if translation else n)
            Tokenizer.train(sample, tmp / TOKENIZER, k.vocab_size, k.type, k.character_coverage, k.max_sentences)
            sampled = len(sample)
            del sample
        tokenizer = Tokenizer(tmp / TOKENIZER)
        timings["tokenizer_s"] = time.perf_counter() - start
        id_dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32)
        start = time.perf_counter()
        splits = {}
        cfg = settings(recipe)
        for split in ("train", "valid"):
            spec = getattr(d, split)
            if spec is None:
                continue
            if translation:
                pairs = iter_pairs(spec, d.src_lang, d.tgt_lang, data_dir)
                if split == "valid":  # kept whole, and its targets as text for BLEU
                    pairs = list(pairs)
                    write_atomic(tmp / REFERENCES, json.dumps([t for _, t in pairs], ensure_ascii=False).encode())
                splits[split] = _write_pairs(pairs, tokenizer, tmp, split, id_dtype,
                                             cfg["max_len"] if split == "train" else None, cfg["max_ratio"], chunk,
                                             threads)
            else:
                splits[split] = _write_text(iter_text_lines(spec, d.tgt_lang, data_dir), tokenizer, tmp, split,
                                            id_dtype, chunk, threads)
        timings["tokenize_s"] = time.perf_counter() - start
        for split_sources in sources.values():
            for source in split_sources:
                source["sha256"] = _sha256(Path(source["path"]))
        manifest = {"format": FORMAT, "settings": cfg, "sources": sources, "id_dtype": id_dtype.name,
                    "tokenizer_sha256": _sha256(tmp / TOKENIZER), "tokenizer_sample": sampled, "splits": splits,
                    "seconds": {k: round(v, 2) for k, v in timings.items()}}
        write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        if out.exists():  # an earlier store (checked above): moved aside, then removed once the new one is in place
            old = out.parent / f".{out.name}.old{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# -- Reading ------------------------------------------------------------------------------------------------------

class OnDisk:
    """A read-only array in a file, read by positioned reads (pread) of the runs asked for. Not memory-mapped: a
    batch's sentences lie all over the file, and each page fault on a mapping brings in the pages around it too,
    so a mapped store soon sits in every process's resident memory; read this way, a process holds only its
    batch, and the ranks still share the files through the page cache."""

    def __init__(self, path: str | os.PathLike, dtype: Any):
        self.path, self.dtype = str(path), np.dtype(dtype)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.size = os.path.getsize(self.path) // self.dtype.itemsize

    def __len__(self) -> int:
        return self.size

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            os.close(self.fd)

    def __getstate__(self) -> dict[str, Any]:  # a copy in another process opens the file anew
        return {"path": self.path, "dtype": self.dtype}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["dtype"])

    def runs(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        n = self.dtype.itemsize
        return np.frombuffer(b"".join(os.pread(self.fd, int(length) * n, int(start) * n)
                                      for start, length in zip(starts, lengths)), dtype=self.dtype)


def runs(array: np.ndarray | OnDisk, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """array[starts[0]:starts[0] + lengths[0]], array[starts[1]:...], ... back to back, from memory or disk."""
    if isinstance(array, OnDisk):
        return array.runs(starts, lengths)
    if len(starts) == 0:
        return array[:0]
    return np.concatenate([array[start:start + length] for start, length in zip(starts, lengths)])


def take(array: np.ndarray | OnDisk, indices: np.ndarray) -> np.ndarray:
    return runs(array, indices, np.ones(len(indices), dtype=np.int64))


class Side:
    """One side of a split: sentence i is ids[offsets[i]:offsets[i + 1]], its length lengths[i]. `ids` and
    `offsets` are OnDisk in a store (numpy arrays for data made in memory); the lengths are in memory."""

    def __init__(self, ids: np.ndarray | OnDisk, offsets: np.ndarray | OnDisk, lengths: np.ndarray):
        self.ids, self.offsets, self.lengths = ids, offsets, lengths

    @classmethod
    def open(cls, stem: str, id_dtype: str, length_dtype: str) -> "Side":
        return cls(OnDisk(f"{stem}.ids", id_dtype), OnDisk(f"{stem}.offsets", np.int64),
                   np.fromfile(f"{stem}.lengths", dtype=length_dtype))

    @classmethod
    def of(cls, sentences: list[list[int]]) -> "Side":
        """An in-memory side (tests, small data): the same layout."""
        lengths = np.array([len(s) for s in sentences], dtype=np.int64)
        ids = np.fromiter(itertools.chain.from_iterable(sentences), dtype=np.int64, count=int(lengths.sum()))
        return cls(ids, np.concatenate([[0], np.cumsum(lengths)]), lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def head(self, n: int) -> "Side":
        return Side(self.ids, self.offsets, self.lengths[:n])

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens(np.array([i])).astype(np.int64)

    def tokens(self, indices: np.ndarray) -> np.ndarray:
        """The tokens of sentences `indices`, back to back."""
        return runs(self.ids, take(self.offsets, indices), self.lengths[indices])

    def place(self, indices: np.ndarray, out: np.ndarray, column: np.ndarray | int) -> None:
        """Write sentence indices[r] into row r of `out` from `column` (per row, or one for all)."""
        lengths = self.lengths[indices].astype(np.int64)
        cols = np.arange(out.shape[1])[None, :] - np.reshape(column, (-1, 1))
        inside = (cols >= 0) & (cols < lengths[:, None])
        out[inside] = self.tokens(indices)  # row by row, left to right: the sentences in order


class Pairs:
    """A split of a translation store: `src` and `tgt` sides and the corpus line of each pair (`index`)."""

    def __init__(self, src: Side, tgt: Side, index: np.ndarray | OnDisk):
        self.src, self.tgt, self.index = src, tgt, index

    @classmethod
    def of(cls, src: list[list[int]], tgt: list[list[int]]) -> "Pairs":
        return cls(Side.of(src), Side.of(tgt), np.arange(len(src)))

    def __len__(self) -> int:
        return len(self.src)

    def head(self, n: int) -> "Pairs":
        return Pairs(self.src.head(n), self.tgt.head(n), self.index)

    def lines(self, indices: np.ndarray) -> np.ndarray:
        """The corpus line numbers of pairs `indices`."""
        return take(self.index, indices).astype(np.int64)


class Store:
    """An opened store: its manifest, tokenizer, and splits (read from disk as batches ask)."""

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.directory, self.manifest = directory, manifest

    @property
    def tokenizer_file(self) -> Path:
        return self.directory / TOKENIZER

    def has(self, split: str) -> bool:
        return split in self.manifest["splits"]

    def _side(self, split: str, side: str) -> Side:
        return Side.open(str(self.directory / f"{split}.{side}"), self.manifest["id_dtype"],
                         self.manifest["splits"][split][side]["length_dtype"])

    def pairs(self, split: str) -> Pairs:
        return Pairs(self._side(split, "src"), self._side(split, "tgt"),
                     OnDisk(self.directory / f"{split}.index", np.int64))

    def stream(self, split: str) -> OnDisk:
        """A language model's split: every line's tokens and its EOS, back to back."""
        return OnDisk(self.directory / f"{split}.text.ids", self.manifest["id_dtype"])

    def references(self) -> list[str]:
        path = self.directory / REFERENCES
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def open_store(directory: str | os.PathLike, recipe: Recipe | None = None,
               data_dir: str | os.PathLike | None = None) -> Store:
    """Open a store, refusing one that is incomplete, of another format, whose tokenizer is not the one it was
    prepared with, or (given a recipe) prepared with other settings or from corpus files that changed since."""
    directory = Path(directory)
    manifest_file = directory / MANIFEST
    if not manifest_file.is_file():
        what = "an incomplete store (no manifest: its prepare did not finish)" if directory.is_dir() else "no store"
        raise StoreError(f"{directory}: {what}; run translator prepare (every node needs the store at this path)")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{directory}: a store of format {manifest.get('format')}; this translator reads {FORMAT}. "
                         "Prepare it again")
    if not (directory / TOKENIZER).is_file() or _sha256(directory / TOKENIZER) != manifest["tokenizer_sha256"]:
        raise StoreError(f"{directory / TOKENIZER}: not the sentencepiece model this store was prepared with")
    if recipe is not None:
        expected, found = settings(recipe), manifest["settings"]
        for key in sorted(set(expected) | set(found)):
            if expected.get(key) != found.get(key):
                raise StoreError(f"{directory}: prepared with {key}={found.get(key)!r}, but the recipe gives "
                                 f"{expected.get(key)!r}; prepare it again (or use the recipe it was prepared for)")
        try:
            now = _sources(recipe, data_dir, hub=False)
        except DataError:
            now = None  # the corpus files are not here (another machine, no --data-dir): nothing to compare
        then = manifest["sources"]
        if now is not None and (set(now) != set(then) or any(len(now[split]) != len(then[split]) for split in now)):
            raise StoreError(f"{directory}: the recipe's corpus files are not the ones the store was prepared from; "
                             "prepare it again")
        changed = [] if now is None else [a["path"] for split in now for a, b in zip(now[split], then[split])
                                          if not _unchanged(a, b)]
        if changed:
            raise StoreError(f"{directory}: {', '.join(changed)} changed since the store was "
                             "prepared; prepare it again")
    return Store(directory, manifest)
