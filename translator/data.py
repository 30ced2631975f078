"""Raw text in: corpora as streams, and sentencepiece.

Corpora come from local line-aligned files (plain or .gz), IWSLT xml / WMT sgm test files, or a
Hugging Face `datasets` name (or a local `datasets` directory: the same code path, streamed). Every error
names the file and line. `store.py` turns them into the token store that training reads.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .config import SPECIAL_IDS

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Input data that cannot be used as it is; the message names the file (and line)."""


# -- Reading text ----------------------------------------------------------------------------------------------

def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_lines(path: str | os.PathLike, strip: bool = True) -> Iterator[str]:
    """Lines of a UTF-8 text file, plain or .gz, read as a stream, without line endings (and stripped, by
    default). Bad bytes stop it with the file and line named."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with _open_binary(path) as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                    f"{e.start + 1})") from None
                line = line.rstrip("\r\n")
                yield line.strip() if strip else line
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def read_lines(path: str | os.PathLike, strip: bool = True) -> list[str]:
    return list(iter_lines(path, strip))


_SEGMENT = re.compile(r"<seg[^>]*>(.*)</seg>", re.IGNORECASE)


def iter_segments(path: str | os.PathLike) -> Iterator[str]:
    """The <seg> texts of an IWSLT xml or WMT sgm file, whitespace collapsed (as sacrebleu reads them)."""
    found = False
    for line in iter_lines(path):
        match = _SEGMENT.search(line)
        if match:
            found = True
            yield " ".join(match.group(1).split())
    if not found:
        raise DataError(f"{path}: no <seg> elements found")


def read_segments(path: str | os.PathLike) -> list[str]:
    return list(iter_segments(path))


def iter_text(path: str | os.PathLike) -> Iterator[str]:
    name = str(path)
    return iter_segments(path) if name.endswith((".xml", ".sgm", ".xml.gz", ".sgm.gz")) else iter_lines(path)


def read_text(path: str | os.PathLike) -> list[str]:
    return list(iter_text(path))


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


Spec = str | dict[str, Any] | list  # a list: alternatives, the first available taken


def choose(spec: Spec, langs: Sequence[str], data_dir: str | os.PathLike | None,
           hub: bool = True) -> str | dict[str, Any]:
    """A corpus spec as it is, or, for a list of alternatives (e.g. local files, then the same corpus on the
    hub), the first that is there: files that exist, or (unless hub=False) a `datasets` corpus that opens. None
    there: one line that names what was tried and where files would go."""
    if not isinstance(spec, list):
        return spec
    tried = []
    for alternative in spec:
        try:
            if isinstance(alternative, dict) and not hub:
                raise DataError(f"{_hub_name(alternative)}: not asked")
            if isinstance(alternative, dict):  # opens, and has a first row of the right columns
                next(iter_hub_pairs(alternative, langs[0], langs[-1]))
            else:
                corpus_files(alternative, langs, data_dir)
            return alternative
        except DataError as e:
            tried.append(str(e))
    where = f"into {data_dir}" if data_dir is not None else "beside it (or pass --data-dir)"
    raise DataError(f"no alternative of the corpus is available: {'; '.join(tried)}. Put the files {where}")


def corpus_files(spec: Spec, langs: Sequence[str], data_dir: str | os.PathLike | None,
                 hub: bool = True) -> list[Path]:
    """The files a corpus spec reads (none for a `datasets` spec), checked to exist."""
    spec = choose(spec, langs, data_dir, hub)
    if isinstance(spec, dict):
        return []
    if len(langs) == 1:  # monolingual: {lang} optional
        path = Path(spec.replace("{lang}", langs[0]))
        paths = [path if path.is_absolute() or data_dir is None else Path(data_dir) / path]
    else:
        paths = list(resolve_files(spec, langs[0], langs[1], data_dir))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"corpus {spec!r}: missing file(s) {', '.join(missing)}"
                        + ("" if data_dir is None else f" (data directory: {data_dir})"))
    return paths


def iter_pairs(spec: Spec, src_lang: str, tgt_lang: str,
               data_dir: str | os.PathLike | None = None) -> Iterator[tuple[str, str]]:
    """(source, target) lines of a parallel corpus, as a stream: a file pattern (plain, .gz, IWSLT xml, WMT sgm)
    or a `datasets` spec {hub: NAME, config: C, split: S}, or a list of alternatives (see `choose`). Misaligned
    or empty corpora stop it, named."""
    spec = choose(spec, (src_lang, tgt_lang), data_dir)
    if isinstance(spec, dict):
        yield from iter_hub_pairs(spec, src_lang, tgt_lang)
        return
    src_path, tgt_path = corpus_files(spec, (src_lang, tgt_lang), data_dir)
    src, tgt = iter_text(src_path), iter_text(tgt_path)
    n = 0
    for n, (s, t) in enumerate(itertools.zip_longest(src, tgt), 1):
        if s is None or t is None:  # one side ended: count the rest of the other for the message
            longer = sum(1 for _ in (tgt if s is None else src)) + n
            lengths = (n - 1, longer) if s is None else (longer, n - 1)
            raise DataError(f"{src_path} has {lengths[0]} lines but {tgt_path} has {lengths[1]}: the files must be "
                            f"line-aligned (line {n} has no partner)")
        yield s, t
    if n == 0:
        raise DataError(f"{src_path}: empty corpus")


def load_corpus(spec: Spec, src_lang: str, tgt_lang: str,
                data_dir: str | os.PathLike | None = None) -> Corpus:
    """A whole parallel corpus in memory (for evaluation sets; training data goes through store.prepare)."""
    spec = choose(spec, (src_lang, tgt_lang), data_dir)
    pairs = list(iter_pairs(spec, src_lang, tgt_lang, data_dir))
    name = _hub_name(spec) if isinstance(spec, dict) else str(resolve_files(spec, src_lang, tgt_lang, data_dir)[0])
    return Corpus([s for s, _ in pairs], [t for _, t in pairs], name=name)


HUB_KEYS = {"hub", "config", "split", "revision"}


def _hub_name(spec: dict[str, Any]) -> str:
    return f"datasets corpus {spec['hub']!r} split {spec.get('split', 'train')!r}"


def iter_hub_pairs(spec: dict[str, Any], src_lang: str, tgt_lang: str) -> Iterator[tuple[str, str]]:
    """A corpus through Hugging Face `datasets` with streaming=True (rows arrive one at a time; no table is held
    in memory): a hub name (e.g. wmt14 with config de-en) or a local directory of json/csv/parquet files. Rows
    are {"translation": {src: .., tgt: ..}} or columns src, tgt (both "text" for monolingual text)."""
    unknown = set(spec) - HUB_KEYS
    if unknown or "hub" not in spec:
        raise DataError(f"corpus {spec}: a datasets corpus takes keys {sorted(HUB_KEYS)} with 'hub' required")
    import datasets  # imported here: slow to import, and only this path needs it

    name, split, where = spec["hub"], spec.get("split", "train"), _hub_name(spec)
    try:
        rows = iter(datasets.load_dataset(name, spec.get("config"), split=split, revision=spec.get("revision"),
                                          streaming=True))
        first = next(rows, None)
    except Exception as e:  # datasets raises many types; keep its message, name the corpus
        raise DataError(f"datasets corpus {name!r} (config {spec.get('config')!r}, split {split!r}): "
                        f"{' '.join(str(e).split())}") from None
    if first is None:
        raise DataError(f"{where}: empty corpus")
    if "translation" in first:
        pick = lambda row: (row["translation"][src_lang], row["translation"][tgt_lang])
        if not {src_lang, tgt_lang} <= set(first["translation"]):
            raise DataError(f"{where}: translation rows have no language {src_lang!r} or {tgt_lang!r}; found "
                            f"{sorted(first['translation'])}")
    elif src_lang in first and tgt_lang in first:
        pick = lambda row: (row[src_lang], row[tgt_lang])
    elif src_lang == tgt_lang and "text" in first:  # monolingual: a language's column, else 'text'
        pick = lambda row: (row["text"], row["text"])
    else:
        raise DataError(f"{where}: needs a 'translation' column or columns {src_lang!r} and {tgt_lang!r}; "
                        f"found {sorted(first)}")
    for i, row in enumerate(itertools.chain([first], rows)):
        try:
            s, t = pick(row)
        except (KeyError, TypeError):
            raise DataError(f"{where}: row {i} has no {src_lang!r}/{tgt_lang!r} text") from None
        for side, line in (("source", s), ("target", t)):
            if not isinstance(line, str):
                raise DataError(f"{where}: row {i} {side} is {type(line).__name__}, not text")
        yield s.strip(), t.strip()


def iter_text_lines(spec: Spec, lang: str, data_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """Monolingual lines (task lm): a file pattern ({lang} optional) relative to data_dir, or a datasets spec
    whose rows have the language's column (or a 'text' one)."""
    spec = choose(spec, (lang,), data_dir)
    if isinstance(spec, dict):
        yield from (s for s, _ in iter_hub_pairs(spec, lang, lang))
        return
    (path,) = corpus_files(spec, (lang,), data_dir)
    n = 0
    for n, line in enumerate(iter_text(path), 1):
        yield line
    if n == 0:
        raise DataError(f"{path}: empty corpus")


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

    def encode(self, lines: Sequence[str], threads: int | None = None) -> list[list[int]]:
        return self.sp.encode(list(lines), num_threads=threads or os.cpu_count() or 1)

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
