"""From raw parallel text to batches: corpora, sentencepiece, and batching by tokens.

Corpora come from local line-aligned files (plain or .gz), IWSLT xml / WMT sgm test files, or a
Hugging Face `datasets` name (or a local `datasets` directory: the same code path). Every error names
the file and line. Batches hold up to `max_tokens` tokens, padding included, from sentences of similar
length, shuffled per epoch under a seed, and can resume in the middle of an epoch.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .config import SPECIAL_IDS

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Input data that cannot be used as it is; the message names the file (and line)."""


# -- Reading text ----------------------------------------------------------------------------------------------

def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_lines(path: str | os.PathLike, strip: bool = True) -> list[str]:
    """Lines of a UTF-8 text file, plain or .gz, without line endings (and stripped, by default)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    lines = []
    try:
        with _open_binary(path) as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                    f"{e.start + 1})") from None
                line = line.rstrip("\r\n")
                lines.append(line.strip() if strip else line)
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    return lines


_SEGMENT = re.compile(r"<seg[^>]*>(.*)</seg>", re.IGNORECASE)


def read_segments(path: str | os.PathLike) -> list[str]:
    """The <seg> texts of an IWSLT xml or WMT sgm file, whitespace collapsed (as sacrebleu reads them)."""
    segments = []
    for line in read_lines(path):
        match = _SEGMENT.search(line)
        if match:
            segments.append(" ".join(match.group(1).split()))
    if not segments:
        raise DataError(f"{path}: no <seg> elements found")
    return segments


def read_text(path: str | os.PathLike) -> list[str]:
    name = str(path)
    return read_segments(path) if name.endswith((".xml", ".sgm", ".xml.gz", ".sgm.gz")) else read_lines(path)


# -- Corpora ---------------------------------------------------------------------------------------------------

@dataclass
class Corpus:
    """A parallel corpus: source and target lines, line-aligned, and where they came from."""

    src: list[str]
    tgt: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.src)


def resolve_files(spec: str, src_lang: str, tgt_lang: str, data_dir: str | os.PathLike | None) -> tuple[Path, Path]:
    """'multi30k/train.{lang}.gz' -> (.../train.en.gz, .../train.de.gz), relative to data_dir."""
    if "{lang}" not in spec:
        raise DataError(f"corpus {spec!r}: a file pattern needs a {{lang}} placeholder, e.g. 'train.{{lang}}.gz'")
    base = Path(data_dir) if data_dir is not None else Path(".")
    src, tgt = (Path(spec.replace("{lang}", lang)) for lang in (src_lang, tgt_lang))
    return (src if src.is_absolute() else base / src), (tgt if tgt.is_absolute() else base / tgt)


def load_corpus(spec: str | dict[str, Any], src_lang: str, tgt_lang: str,
                data_dir: str | os.PathLike | None = None) -> Corpus:
    """Read a parallel corpus from a file pattern or a `datasets` spec {hub: NAME, config: C, split: S}."""
    if isinstance(spec, dict):
        return load_hub_corpus(spec, src_lang, tgt_lang)
    src_path, tgt_path = resolve_files(spec, src_lang, tgt_lang, data_dir)
    missing = [str(p) for p in (src_path, tgt_path) if not p.is_file()]
    if missing:
        raise DataError(f"corpus {spec!r}: missing file(s) {', '.join(missing)}"
                        + ("" if data_dir is None else f" (data directory: {data_dir})"))
    src, tgt = read_text(src_path), read_text(tgt_path)
    if len(src) != len(tgt):
        raise DataError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: the files must be "
                        f"line-aligned (line {min(len(src), len(tgt)) + 1} has no partner)")
    if not src:
        raise DataError(f"{src_path}: empty corpus")
    return Corpus(src, tgt, name=str(src_path))


HUB_KEYS = {"hub", "config", "split", "revision"}


def load_hub_corpus(spec: dict[str, Any], src_lang: str, tgt_lang: str) -> Corpus:
    """A corpus through Hugging Face `datasets`: a hub name (e.g. wmt14 with config de-en) or a local
    directory of json/csv/parquet files. Rows are {"translation": {src: .., tgt: ..}} or columns src, tgt."""
    unknown = set(spec) - HUB_KEYS
    if unknown or "hub" not in spec:
        raise DataError(f"corpus {spec}: a datasets corpus takes keys {sorted(HUB_KEYS)} with 'hub' required")
    import datasets  # imported here: slow to import, and only this path needs it

    name, split = spec["hub"], spec.get("split", "train")
    try:
        table = datasets.load_dataset(name, spec.get("config"), split=split, revision=spec.get("revision"))
    except Exception as e:  # datasets raises many types; keep its message, name the corpus
        raise DataError(f"datasets corpus {name!r} (config {spec.get('config')!r}, split {split!r}): {e}") from None
    where = f"datasets corpus {name!r} split {split!r}"
    if "translation" in table.column_names:
        pairs = table["translation"]
        try:
            src, tgt = [p[src_lang] for p in pairs], [p[tgt_lang] for p in pairs]
        except KeyError as e:
            raise DataError(f"{where}: translation rows have no language {e}; found {sorted(pairs[0])}") from None
    elif src_lang in table.column_names and tgt_lang in table.column_names:
        src, tgt = table[src_lang], table[tgt_lang]
    else:
        raise DataError(f"{where}: needs a 'translation' column or columns {src_lang!r} and {tgt_lang!r}; "
                        f"found {table.column_names}")
    for side, lines in (("source", src), ("target", tgt)):
        for i, line in enumerate(lines):
            if not isinstance(line, str):
                raise DataError(f"{where}: row {i} {side} is {type(line).__name__}, not text")
    if not src:
        raise DataError(f"{where}: empty corpus")
    return Corpus([s.strip() for s in src], [t.strip() for t in tgt], name=where)


# -- Sentencepiece ---------------------------------------------------------------------------------------------

PAD_ID, BOS_ID, EOS_ID, UNK_ID = SPECIAL_IDS  # ModelConfig's defaults, which a recipe may not change


class Tokenizer:
    """A sentencepiece model with the project's special ids: pad 0, bos 1, eos 2, unk 3. Trained with byte
    fallback, so characters outside the vocabulary are spelled as UTF-8 bytes: every text round-trips."""

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(model_file)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no sentencepiece model there")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        ids = (self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id())
        if ids != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise DataError(f"{self.path}: special ids (pad, bos, eos, unk) are {ids}, expected (0, 1, 2, 3)")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, lines: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(lines))

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return [self.sp.decode(list(x)) for x in ids]

    def normalize(self, line: str) -> str:
        """The text that decode(encode(line)) gives back: sentencepiece's NFKC normalisation, spaces collapsed."""
        return self.sp.normalize(line).replace("\u2581", " ").strip()

    @classmethod
    def train(cls, lines: Sequence[str], model_file: str | os.PathLike, vocab_size: int, model_type: str = "bpe",
              character_coverage: float = 1.0, max_sentences: int = 2_000_000, seed: int = 1) -> "Tokenizer":
        """Train on `lines` (source and target together, for a joint vocabulary) and write model_file
        atomically. Corpora larger than max_sentences are sampled with a fixed seed."""
        import sentencepiece as spm

        if model_type not in ("bpe", "unigram"):
            raise DataError(f"tokenizer type {model_type!r}: expected 'bpe' or 'unigram'")
        lines = [line for line in lines if line]
        if not lines:
            raise DataError("cannot train a tokenizer on an empty corpus")
        if len(lines) > max_sentences:
            keep = np.random.default_rng(seed).choice(len(lines), max_sentences, replace=False)
            lines = [lines[i] for i in np.sort(keep)]
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
                character_coverage=character_coverage, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
                byte_fallback=True, num_threads=os.cpu_count() or 1, minloglevel=2, max_sentence_length=16384)
        except RuntimeError as e:
            raise DataError(f"sentencepiece could not train a {vocab_size}-piece {model_type} model: {e}") from None
        write_atomic(model_file, model.getvalue())
        return cls(model_file)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write; once written it is synced to disk and renamed over `path`, so
    `path` is never half-written. If writing fails (a full disk, say) the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


# -- Batching by tokens ------------------------------------------------------------------------------------

@dataclass
class Encoded:
    """A tokenized parallel corpus (no BOS/EOS yet), with the indices of the lines kept."""

    src: list[np.ndarray]
    tgt: list[np.ndarray]
    index: np.ndarray  # line number in the original corpus of each pair

    def __len__(self) -> int:
        return len(self.src)


def encode_corpus(corpus: Corpus, tokenizer: Tokenizer, max_len: int | None = None) -> Encoded:
    """Tokenize; with max_len, drop (and count in the log) training pairs whose either side, with its
    EOS/BOS, is longer than max_len tokens. Evaluation sets are never filtered (max_len=None)."""
    src, tgt = tokenizer.encode(corpus.src), tokenizer.encode(corpus.tgt)
    keep = [i for i in range(len(src)) if max_len is None or (len(src[i]) < max_len and len(tgt[i]) < max_len)]
    dropped = len(src) - len(keep)
    if dropped:
        log.warning("%s: dropped %d of %d pairs longer than %d tokens", corpus.name, dropped, len(src), max_len)
    if not keep:
        raise DataError(f"{corpus.name}: no pair is shorter than max_len={max_len} tokens")
    as_array = lambda ids: np.asarray(ids, dtype=np.int32)
    return Encoded([as_array(src[i]) for i in keep], [as_array(tgt[i]) for i in keep], np.asarray(keep))


def token_batches(src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int, order: np.ndarray) -> list[np.ndarray]:
    """Cut `order` into consecutive batches whose padded size, batch size x longest side, fits max_tokens.
    A sentence longer than max_tokens alone gets a batch of its own."""
    batches, start, longest = [], 0, 0
    lengths = np.maximum(src_lens, tgt_lens)[order]
    for i, n in enumerate(lengths):
        if i > start and max(longest, n) * (i - start + 1) > max_tokens:
            batches.append(order[start:i])
            start, longest = i, 0
        longest = max(longest, n)
    if start < len(order):
        batches.append(order[start:])
    return batches


class ResumableBatches:
    """An iterable of batches for Lightning, shuffled per epoch under a seed, resumable mid-epoch.

    Each batch carries its `position`, (epoch, index). The epoch advances when a pass is exhausted (not when
    Lightning says so: a run stopped by max_steps ends Lightning's epoch early). A run killed mid-epoch saves
    the position after the last batch it trained; `resume_at` set to it makes the next pass continue from
    there (the batches themselves are a pure function of seed and epoch). Subclasses say what the batches
    of an epoch are (`batches`) and how one is built (`collate`)."""

    shuffle: bool

    def __init__(self, shuffle: bool, seed: int, rank: int, world: int):
        self.shuffle, self.seed, self.rank, self.world = shuffle, seed, rank, world
        self.epoch = 0
        self.resume_at: tuple[int, int] | None = None

    def batches(self, epoch: int) -> list[np.ndarray]:
        raise NotImplementedError

    def collate(self, indices: np.ndarray) -> dict[str, Any]:
        raise NotImplementedError

    def _shard(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Each rank takes every world-th batch; the count is trimmed so that every rank gets as many."""
        usable = len(batches) - len(batches) % self.world if self.shuffle else len(batches)
        return batches[:usable][self.rank::self.world]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start = 0
        if self.resume_at is not None:
            self.epoch, start = self.resume_at
            self.resume_at = None
        batches = self.batches(self.epoch)
        if start >= len(batches):  # the run stopped exactly at the end of a pass
            self.epoch, start, batches = self.epoch + 1, 0, self.batches(self.epoch + 1)
        for index in range(start, len(batches)):
            batch = self.collate(batches[index])
            batch["position"] = (self.epoch, index)
            yield batch
        if self.shuffle:
            self.epoch += 1


class TokenBatches(ResumableBatches):
    """Padded translation batches: {"src", "tgt_in", "tgt_out", "index", "ntokens", "position"}.

    Training (shuffle=True): a seeded permutation, then a stable sort by length, so that sentences of
    similar length share a batch with random ties; the batch order is shuffled again per epoch.
    Evaluation (shuffle=False): sorted by length, the same batches every time; `index` restores line order."""

    def __init__(self, data: Encoded, max_tokens: int, shuffle: bool, seed: int = 1, rank: int = 0, world: int = 1,
                 joint: bool = False):
        super().__init__(shuffle, seed, rank, world)
        self.data, self.max_tokens, self.joint = data, max_tokens, joint
        self.src_lens = np.array([len(s) + 1 for s in data.src])  # + EOS
        self.tgt_lens = np.array([len(t) + 1 for t in data.tgt])  # + BOS (input) or EOS (output)
        if joint:  # decoder-only translation: one sequence BOS source EOS target (EOS)
            self.src_lens = self.tgt_lens = self.src_lens + self.tgt_lens

    def batches(self, epoch: int) -> list[np.ndarray]:
        if not self.shuffle:
            order = np.lexsort((self.tgt_lens, self.src_lens))
            return self._shard(token_batches(self.src_lens, self.tgt_lens, self.max_tokens, order))
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.src_lens))
        order = order[np.lexsort((self.src_lens[order], self.tgt_lens[order]))]  # stable: ties stay random
        batches = token_batches(self.src_lens, self.tgt_lens, self.max_tokens, order)
        rng.shuffle(batches)
        return self._shard(batches)

    def collate(self, indices: np.ndarray) -> dict[str, Any]:
        src = [self.data.src[i] for i in indices]
        tgt = [self.data.tgt[i] for i in indices]
        S, T = max(len(s) for s in src) + 1, max(len(t) for t in tgt) + 1
        src_ids = np.full((len(indices), S), PAD_ID, dtype=np.int64)
        tgt_in = np.full((len(indices), T), PAD_ID, dtype=np.int64)
        tgt_out = np.full((len(indices), T), PAD_ID, dtype=np.int64)
        for row, (s, t) in enumerate(zip(src, tgt)):
            src_ids[row, :len(s)], src_ids[row, len(s)] = s, EOS_ID
            tgt_in[row, 0], tgt_in[row, 1:len(t) + 1] = BOS_ID, t
            tgt_out[row, :len(t)], tgt_out[row, len(t)] = t, EOS_ID
        batch = {"src": torch.from_numpy(src_ids), "tgt_in": torch.from_numpy(tgt_in),
                 "tgt_out": torch.from_numpy(tgt_out), "index": torch.from_numpy(self.data.index[indices]),
                 "ntokens": int(sum(len(t) + 1 for t in tgt))}
        return self._joint(batch, src, tgt) if self.joint else batch

    @staticmethod
    def _joint(batch: dict[str, Any], src: list[np.ndarray], tgt: list[np.ndarray]) -> dict[str, Any]:
        """Decoder-only translation: inputs BOS source EOS target, predicting the target and its EOS only
        (EOS separates the two sides). `prefix_len` covers BOS, source and separator; `src` stays for decoding."""
        T = max(len(s) + len(t) + 2 for s, t in zip(src, tgt))
        tokens_in = np.full((len(src), T), PAD_ID, dtype=np.int64)
        tokens_out = np.full((len(src), T), PAD_ID, dtype=np.int64)
        prefix_len = np.zeros(len(src), dtype=np.int64)
        for row, (s, t) in enumerate(zip(src, tgt)):
            seq = np.concatenate([[BOS_ID], s, [EOS_ID], t, [EOS_ID]])
            tokens_in[row, :len(seq) - 1] = seq[:-1]
            tokens_out[row, len(s) + 1:len(seq) - 1] = seq[len(s) + 2:]
            prefix_len[row] = len(s) + 2
        batch.update(tgt_in=torch.from_numpy(tokens_in), tgt_out=torch.from_numpy(tokens_out),
                     prefix_len=torch.from_numpy(prefix_len))
        return batch


# -- Language modelling: lines packed into fixed-length blocks -------------------------------------------------

def load_text(spec: str | dict[str, Any], lang: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Monolingual lines: a file pattern ({lang} optional) relative to data_dir, or a datasets spec whose rows
    have a 'text' column."""
    if isinstance(spec, dict):
        corpus = load_hub_corpus(spec, "text", "text")
        return corpus.src
    path = Path(spec.replace("{lang}", lang))
    path = path if path.is_absolute() or data_dir is None else Path(data_dir) / path
    lines = read_text(path)
    if not any(lines):
        raise DataError(f"{path}: empty corpus")
    return lines


def pack_blocks(token_lines: Sequence[Sequence[int]], block_size: int) -> np.ndarray:
    """Concatenate lines, each closed by EOS, and cut the stream into rows of block_size + 1 tokens (inputs
    and next-token targets overlap by one); the ragged tail is dropped."""
    stream = np.fromiter((t for line in token_lines for t in (*line, EOS_ID)), dtype=np.int64)
    n = (len(stream) - 1) // block_size
    if n < 1:
        raise DataError(f"corpus of {len(stream)} tokens is shorter than one block of {block_size + 1}")
    return np.lib.stride_tricks.sliding_window_view(stream, block_size + 1)[::block_size][:n].copy()


class BlockBatches(ResumableBatches):
    """Batches of packed blocks for next-token prediction: {"tgt_in", "tgt_out", "ntokens", "position"}."""

    def __init__(self, blocks: np.ndarray, max_tokens: int, shuffle: bool, seed: int = 1, rank: int = 0, world: int = 1):
        super().__init__(shuffle, seed, rank, world)
        self.blocks = blocks
        self.per_batch = max(1, max_tokens // (blocks.shape[1] - 1))

    def batches(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks)) if self.shuffle \
            else np.arange(len(self.blocks))
        return self._shard([order[i:i + self.per_batch] for i in range(0, len(order), self.per_batch)])

    def collate(self, indices: np.ndarray) -> dict[str, Any]:
        rows = torch.from_numpy(self.blocks[np.sort(indices)])
        return {"tgt_in": rows[:, :-1], "tgt_out": rows[:, 1:], "ntokens": int(rows[:, 1:].numel())}
