import gzip
import json
import logging

import numpy as np
import pytest

from translator.data import (BOS_ID, EOS_ID, PAD_ID, Corpus, DataError, TokenBatches, Tokenizer, encode_corpus,
                             load_corpus, read_lines, read_segments, token_batches)

from .conftest import shared_data


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


# -- Batching --------------------------------------------------------------------------------------------------

def synthetic(n=500, seed=0):
    rng = np.random.default_rng(seed)
    src = [rng.integers(4, 50, rng.integers(1, 30)).astype(np.int32) for _ in range(n)]
    tgt = [rng.integers(4, 50, rng.integers(1, 30)).astype(np.int32) for _ in range(n)]
    from translator.data import Encoded
    return Encoded(src, tgt, np.arange(n))


def test_batches_respect_max_tokens_and_cover_every_pair_once():
    data = synthetic()
    loader = TokenBatches(data, max_tokens=200, shuffle=True, seed=3)
    seen = []
    for batch in loader:
        B, S = batch["src"].shape
        T = batch["tgt_in"].shape[1]
        assert B * max(S, T) <= 200
        seen.extend(batch["index"].tolist())
    assert sorted(seen) == list(range(500))


def test_batch_contents_teacher_forcing_layout():
    data = synthetic(20)
    batch = TokenBatches(data, max_tokens=10_000, shuffle=False).collate(np.array([3, 7]))
    for row, i in enumerate([3, 7]):
        s, t = data.src[i].tolist(), data.tgt[i].tolist()
        assert batch["src"][row, :len(s) + 1].tolist() == s + [EOS_ID]
        assert batch["tgt_in"][row, :len(t) + 1].tolist() == [BOS_ID] + t
        assert batch["tgt_out"][row, :len(t) + 1].tolist() == t + [EOS_ID]
        assert (batch["src"][row, len(s) + 1:] == PAD_ID).all() and (batch["tgt_out"][row, len(t) + 1:] == PAD_ID).all()
    assert batch["ntokens"] == len(data.tgt[3]) + len(data.tgt[7]) + 2


def test_sentences_of_similar_length_share_a_batch():
    data = synthetic(2000)
    loader = TokenBatches(data, max_tokens=400, shuffle=True)
    real = sum(loader.tgt_lens) + sum(loader.src_lens)
    padded = sum(b["src"].numel() + b["tgt_in"].numel() for b in loader)
    assert real / padded > 0.85  # random batching would waste about half


def test_shuffling_is_seeded_and_changes_per_epoch():
    data = synthetic()
    order = lambda seed, epoch: [b.tolist() for b in TokenBatches(data, 200, True, seed=seed).batches(epoch)]
    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)


def test_resuming_mid_epoch_yields_the_remaining_batches():
    data = synthetic()
    loader = TokenBatches(data, 200, True, seed=5)
    epoch0 = [b["index"].tolist() for b in loader]
    epoch1 = [(b["position"], b["index"].tolist()) for b in loader]  # a finished pass advances the epoch
    assert epoch1[0][0] == (1, 0) and [x for _, x in epoch1] != epoch0
    loader.resume_at = (0, 7)
    resumed = [(b["position"], b["index"].tolist()) for b in loader]
    assert resumed[0][0] == (0, 7) and [x for _, x in resumed] == epoch0[7:]
    assert [b["position"] for b in loader][0] == (1, 0)  # then the next epoch, from its start
    loader.resume_at = (0, len(epoch0))  # stopped right at the end of epoch 0
    assert [b["position"] for b in loader][0] == (1, 0)


def test_ranks_take_disjoint_equal_shares():
    data = synthetic()
    shards = [[b.tolist() for b in TokenBatches(data, 200, True, seed=1, rank=r, world=3).batches(0)] for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    flat = [i for s in shards for b in s for i in b]
    assert len(flat) == len(set(flat))


def test_a_sentence_longer_than_max_tokens_gets_its_own_batch():
    batches = token_batches(np.array([5, 50, 5]), np.array([5, 50, 5]), 20, np.arange(3))
    assert [b.tolist() for b in batches] == [[0], [1], [2]]


def test_overlong_training_pairs_are_dropped_and_counted(caplog, tmp_path):
    from .conftest import write_toy_corpus

    toy = write_toy_corpus(tmp_path, n_train=500) / "toy"
    tokenizer = Tokenizer.train(read_lines(toy / "train.en") + read_lines(toy / "train.de"), tmp_path / "spm.model",
                                vocab_size=300)
    corpus = Corpus(["short one", "word " * 100, "another short"], ["kurz", "wort " * 3, "noch kurz"], "toy")
    with caplog.at_level(logging.WARNING, logger="translator.data"):
        encoded = encode_corpus(corpus, tokenizer, max_len=50)
    assert encoded.index.tolist() == [0, 2]
    assert "dropped 1 of 3 pairs longer than 50 tokens" in caplog.text
    assert len(encode_corpus(corpus, tokenizer)) == 3  # evaluation sets keep everything
