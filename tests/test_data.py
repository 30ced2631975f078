import gzip
import json
from pathlib import Path

import pytest

from translator.data import BOS_ID, EOS_ID, PAD_ID, DataError, Tokenizer, iter_pairs, load_corpus, read_lines, read_segments

from .conftest import shared_data

ROOT = Path(__file__).resolve().parents[1]


def write(path, lines, gz=False):
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# -- Reading ---------------------------------------------------------------------------------------------------

def test_plain_and_gzip_files_read_alike(tmp_path):
    lines = ["Ein Hund läuft.", "", "  zwei  Leerzeichen "]
    assert read_lines(write(tmp_path / "a.txt", lines)) == ["Ein Hund läuft.", "", "zwei  Leerzeichen"]
    assert read_lines(write(tmp_path / "a.txt.gz", lines, gz=True)) == ["Ein Hund läuft.", "", "zwei  Leerzeichen"]


def test_invalid_utf8_names_file_line_and_byte(tmp_path):
    path = tmp_path / "bad.de"
    path.write_bytes(b"gut\nauch gut\nschlecht \xff hier\n")
    with pytest.raises(DataError, match=r"bad.de:3: not valid UTF-8 \(byte 0xff at column 10\)"):
        read_lines(path)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.en.gz"
    path.write_bytes(gzip.compress(b"one\ntwo\n" * 1000)[:50])
    with pytest.raises(DataError, match="cut.en.gz: cannot read"):
        read_lines(path)


def test_parallel_files_must_align(tmp_path):
    write(tmp_path / "train.en", ["a", "b", "c"])
    write(tmp_path / "train.de", ["x", "y"])
    with pytest.raises(DataError, match=r"train.en has 3 lines but .*train.de has 2.*line 3 has no partner"):
        load_corpus("train.{lang}", "en", "de", tmp_path)
    write(tmp_path / "train.de", ["x", "y", "z", "w", "v"])  # as a stream: the pairs before come out first
    pairs = iter_pairs("train.{lang}", "en", "de", tmp_path)
    assert [next(pairs) for _ in range(3)] == [("a", "x"), ("b", "y"), ("c", "z")]
    with pytest.raises(DataError, match=r"train.en has 3 lines but .*train.de has 5.*line 4 has no partner"):
        next(pairs)


def test_missing_file_is_named(tmp_path):
    write(tmp_path / "train.en", ["a"])
    with pytest.raises(DataError, match=r"missing file\(s\) .*train.de"):
        load_corpus("train.{lang}", "en", "de", tmp_path)


def test_empty_corpus_is_refused(tmp_path):
    write(tmp_path / "train.en", [])
    write(tmp_path / "train.de", [])
    with pytest.raises(DataError, match="empty corpus"):
        load_corpus("train.{lang}", "en", "de", tmp_path)


def test_pattern_needs_a_language_placeholder(tmp_path):
    with pytest.raises(DataError, match="needs a {lang} placeholder"):
        load_corpus("train.en", "en", "de", tmp_path)


def test_multi30k_reads_as_29000_aligned_pairs():
    corpus = load_corpus("multi30k/train.{lang}.gz", "en", "de", shared_data("multi30k").parent)
    assert len(corpus) == 29000
    assert corpus.src[0] == "Two young, White males are outside near many bushes."
    assert corpus.tgt[0] == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."


def test_iwslt_xml_and_wmt_sgm_match_the_extracted_text():
    iwslt = shared_data("iwslt14_de_en")
    segments = read_segments(iwslt / "orig_xml" / "IWSLT14.TED.dev2010.de-en.de.xml")
    assert segments == read_lines(iwslt / "raw" / "IWSLT14.TED.dev2010.de-en.de")
    assert len(segments) == 887
    wmt = shared_data("wmt14_newstest")
    corpus = load_corpus("sgm/newstest2014-deen-src.{lang}.sgm", "en", "de", wmt)
    assert len(corpus) == 3003 and corpus.src == read_lines(wmt / "newstest2014.en")


def test_datasets_path_reads_local_files_like_the_hub(tmp_path):
    # The same load_dataset call serves hub names (wmt14, de-en) and local directories.
    rows = [{"translation": {"de": f"Satz {i}", "en": f"sentence {i}"}} for i in range(5)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    corpus = load_corpus({"hub": str(tmp_path), "split": "train"}, "en", "de")
    assert corpus.src == [f"sentence {i}" for i in range(5)] and corpus.tgt[4] == "Satz 4"
    columns = tmp_path / "columns"
    columns.mkdir()
    (columns / "train.jsonl").write_text("\n".join(json.dumps({"en": f"e{i}", "de": f"d{i}"}) for i in range(3)))
    assert load_corpus({"hub": str(columns)}, "en", "de").tgt == ["d0", "d1", "d2"]
    with pytest.raises(DataError, match=r"needs a 'translation' column or columns 'en' and 'fr'"):
        load_corpus({"hub": str(columns)}, "en", "fr")
    with pytest.raises(DataError, match="takes keys"):
        load_corpus({"hub": str(columns), "splitt": "x"}, "en", "de")


# -- Sentencepiece ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def multi30k_tokenizer(tmp_path_factory):
    corpus = load_corpus("multi30k/val.{lang}.gz", "en", "de", shared_data("multi30k").parent)
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    return Tokenizer.train(corpus.src + corpus.tgt, path, vocab_size=1000), corpus


def test_tokenizer_special_ids_and_round_trip(multi30k_tokenizer):
    tokenizer, corpus = multi30k_tokenizer
    assert tokenizer.vocab_size == 1000
    assert [tokenizer.sp.id_to_piece(i) for i in (PAD_ID, BOS_ID, EOS_ID)] == ["<pad>", "<s>", "</s>"]
    lines = corpus.src[:200] + corpus.tgt[:200] + ["Ünïcödé — “quotes” and ½ fractions"]
    decoded = tokenizer.decode(tokenizer.encode(lines))
    assert decoded == [tokenizer.normalize(line) for line in lines]
    assert decoded[-1] == "Ünïcödé — “quotes” and 1⁄2 fractions"  # byte fallback: no unknown-token marks
    changed = [line for line, out in zip(lines, decoded) if line != out]
    assert len(changed) <= 2 and all("\xa0" in line for line in changed[:-1])  # NFKC: no-break space -> space


def test_tokenizer_training_is_deterministic(tmp_path, multi30k_tokenizer):
    _, corpus = multi30k_tokenizer
    a = Tokenizer.train(corpus.src, tmp_path / "a.model", vocab_size=500)
    b = Tokenizer.train(corpus.src, tmp_path / "b.model", vocab_size=500)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.encode(corpus.tgt[:5]) == b.encode(corpus.tgt[:5])


def test_tokenizer_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="could not train a 5000-piece bpe model"):
        Tokenizer.train(["tiny corpus"] * 3, tmp_path / "x.model", vocab_size=5000)
    with pytest.raises(DataError, match="no sentencepiece model"):
        Tokenizer(tmp_path / "absent.model")
    with pytest.raises(DataError, match="empty corpus"):
        Tokenizer.train(["", ""], tmp_path / "y.model", vocab_size=50)


def test_a_corpus_falls_back_to_the_hub_when_its_files_are_absent(tmp_path, monkeypatch):
    """The Multi30k recipes name the local files, then bentrevett/multi30k on the hub: a local directory of the
    same name stands in for the hub (datasets loads a local directory before asking the hub)."""
    from translator.config import load_recipe

    monkeypatch.chdir(tmp_path)
    hub = tmp_path / "bentrevett" / "multi30k"
    hub.mkdir(parents=True)
    for split, n in (("train", 30), ("validation", 5), ("test", 4)):
        (hub / f"{split}.jsonl").write_text("\n".join(json.dumps({"en": f"{split} sentence {i}", "de": f"{split} Satz {i}"})
                                                      for i in range(n)))
    recipe = load_recipe(ROOT / "recipes/multi30k/en_de.yaml")
    data_dir = tmp_path / "empty"
    data_dir.mkdir()
    test = load_corpus(recipe.data.test, "en", "de", data_dir)
    assert test.src == [f"test sentence {i}" for i in range(4)] and "bentrevett/multi30k" in test.name
    assert list(iter_pairs(recipe.data.valid, "en", "de", data_dir))[-1] == ("validation sentence 4", "validation Satz 4")
    lm = load_recipe(ROOT / "recipes/lm/multi30k_de.yaml")
    from translator.data import iter_text_lines

    assert list(iter_text_lines(lm.data.train, "de", data_dir))[:2] == ["train Satz 0", "train Satz 1"]
    # Files there win over the hub.
    (data_dir / "multi30k").mkdir()
    write(data_dir / "multi30k" / "test_2016_flickr.en.gz", ["local"], gz=True)
    write(data_dir / "multi30k" / "test_2016_flickr.de.gz", ["lokal"], gz=True)
    assert load_corpus(recipe.data.test, "en", "de", data_dir).tgt == ["lokal"]
    # Neither there (offline, no files): one line saying where the files go.
    import shutil

    shutil.rmtree(tmp_path / "bentrevett")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as this machine is (without the wait to learn it)
    with pytest.raises(DataError) as error:
        load_corpus(recipe.data.train, "en", "de", data_dir)
    message = str(error.value)
    assert "\n" not in message and "missing file(s)" in message and "bentrevett/multi30k" in message
    assert message.endswith(f"Put the files into {data_dir}")
