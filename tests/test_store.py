"""The token store: prepared once from streams, read in place by training."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from translator.config import load_recipe
from translator.batching import BlockBatches
from translator.data import EOS_ID, Tokenizer, read_lines
from translator.store import StoreError, open_store, prepare, reservoir

from .conftest import write_toy_corpus


def test_reservoir_sample_is_uniform_seeded_and_in_order():
    sample, n = reservoir(range(10), 20)
    assert sample == list(range(10)) and n == 10  # a short stream is taken whole, in order
    sample, n = reservoir(range(1000), 10, seed=3)
    assert n == 1000 and len(sample) == 10 and sample == sorted(sample) and sample == reservoir(range(1000), 10, 3)[0]
    counts = np.zeros(100)
    for seed in range(2000):
        counts[reservoir(range(100), 10, seed)[0]] += 1
    assert counts.min() > 120 and counts.max() < 290  # each item drawn with probability 1/10 (200 expected)


# -- Preparing and opening -----------------------------------------------------------------------------------------

@pytest.fixture
def toy(tmp_path):
    data_dir = write_toy_corpus(tmp_path / "data", n_train=600, n_valid=50)
    recipe_file = tmp_path / "toy.yaml"
    recipe_file.write_text("""
model: {preset: tiny}
data: {src_lang: en, tgt_lang: de, train: "toy/train.{lang}", valid: "toy/valid.{lang}", max_len: 9}
tokenizer: {vocab_size: 400}
""")
    return data_dir, recipe_file


def test_store_round_trip_equals_direct_tokenization_line_for_line(toy, tmp_path, caplog):
    data_dir, recipe_file = toy
    recipe = load_recipe(recipe_file)
    with caplog.at_level(logging.WARNING, logger="translator.store"):
        manifest = prepare(recipe, data_dir, tmp_path / "store", chunk=64)  # many chunks
    store = open_store(tmp_path / "store", recipe, data_dir)
    tokenizer = Tokenizer(store.tokenizer_file)
    src, tgt = (tokenizer.encode(read_lines(data_dir / f"toy/train.{lang}")) for lang in ("en", "de"))
    kept = [i for i in range(600) if len(src[i]) < 9 and len(tgt[i]) < 9]  # the max_len filter, with EOS
    train = store.pairs("train")
    assert 0 < len(kept) < 600 and train.lines(np.arange(len(train))).tolist() == kept
    assert [train.src[j].tolist() for j in range(len(train))] == [src[i] for i in kept]
    assert [train.tgt[j].tolist() for j in range(len(train))] == [tgt[i] for i in kept]
    assert manifest["splits"]["train"]["dropped_too_long"] == 600 - len(kept)
    assert f"train: dropped {600 - len(kept)} of 600 pairs longer than 9 tokens" in caplog.text
    assert store.manifest["id_dtype"] == "uint16" and train.src.ids.dtype == np.uint16 and train.src.lengths.dtype == np.uint16
    valid = store.pairs("valid")  # validation is never filtered
    assert len(valid) == 50 and store.references() == read_lines(data_dir / "toy/valid.de")


def test_the_length_ratio_filter_drops_and_counts(tmp_path):
    (tmp_path / "c").mkdir()
    src = ["a b c d e f g h i j", "a b", "a b c"] * 40
    tgt = ["k", "k l", "k l m"] * 40
    (tmp_path / "c" / "t.en").write_text("\n".join(src) + "\n")
    (tmp_path / "c" / "t.de").write_text("\n".join(tgt) + "\n")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text('model: {preset: tiny}\ndata: {train: "c/t.{lang}", max_ratio: 3}\n'
                           'tokenizer: {vocab_size: 280}\n')
    manifest = prepare(load_recipe(recipe_file), tmp_path, tmp_path / "store")
    assert manifest["splits"]["train"]["dropped_ratio"] == 40 and manifest["splits"]["train"]["pairs"] == 80


def test_a_stale_or_mismatched_store_is_refused(toy, tmp_path):
    data_dir, recipe_file = toy
    prepare(load_recipe(recipe_file), data_dir, tmp_path / "store")
    open_store(tmp_path / "store", load_recipe(recipe_file), data_dir)  # fits
    with pytest.raises(StoreError, match=r"prepared with max_len=9, but the recipe gives 20"):
        open_store(tmp_path / "store", load_recipe(recipe_file, ["data.max_len=20"]), data_dir)
    with pytest.raises(StoreError, match=r"prepared with tokenizer=.*vocab_size': 400"):
        open_store(tmp_path / "store", load_recipe(recipe_file, ["tokenizer.vocab_size=500"]), data_dir)
    # Settings that do not decide the store's contents may differ.
    open_store(tmp_path / "store", load_recipe(recipe_file, ["train.seed=9", "model.d_model=64"]), data_dir)
    train_en = data_dir / "toy/train.en"
    # A copy of the corpus (new times, another directory) is the same corpus: compared by content.
    moved = tmp_path / "copied"
    shutil.copytree(data_dir, moved)
    os.utime(moved / "toy/train.en", ns=(1, 1))
    open_store(tmp_path / "store", load_recipe(recipe_file), moved)
    # The same size and path with other contents is not.
    text = train_en.read_text()
    train_en.write_text(text.replace("a", "b", 1) if "a" in text else "b" + text[1:])
    with pytest.raises(StoreError, match=r"train.en changed since the store was prepared"):
        open_store(tmp_path / "store", load_recipe(recipe_file), data_dir)
    train_en.write_text(text + "one more line\n")
    with pytest.raises(StoreError, match=r"train.en changed since the store was prepared"):
        open_store(tmp_path / "store", load_recipe(recipe_file), data_dir)
    other = Tokenizer.train(read_lines(data_dir / "toy/train.de"), tmp_path / "other.model", vocab_size=350)
    (tmp_path / "store" / "spm.model").write_bytes(other.path.read_bytes())
    with pytest.raises(StoreError, match=r"spm.model: not the sentencepiece model this store was prepared with"):
        open_store(tmp_path / "store")


def test_prepare_replaces_only_a_store(toy, tmp_path):
    data_dir, recipe_file = toy
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(StoreError, match=r"mine: exists and is not a prepared store \(notes.txt\)"):
        prepare(load_recipe(recipe_file), data_dir, tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    prepare(load_recipe(recipe_file), data_dir, tmp_path / "store")
    prepare(load_recipe(recipe_file, ["data.max_len=20"]), data_dir, tmp_path / "store")  # a store: replaced
    assert open_store(tmp_path / "store").manifest["settings"]["max_len"] == 20
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


KILLED_PREPARE = """
import sys, time
import translator.store as store
from translator.config import load_recipe
real = store._write_pairs
def slow(*args, **kwargs):
    print("tokenizing", flush=True)
    time.sleep(60)
store._write_pairs = slow
store.prepare(load_recipe(sys.argv[1]), sys.argv[2], sys.argv[3])
"""


def test_a_killed_prepare_leaves_no_store_that_looks_complete(toy, tmp_path):
    data_dir, recipe_file = toy
    out = tmp_path / "store"
    process = subprocess.Popen([sys.executable, "-c", KILLED_PREPARE, str(recipe_file), str(data_dir), str(out)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "tokenizing"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()  # only a temporary directory beside it
    with pytest.raises(StoreError, match="no store"):
        open_store(out)
    leftover = next(tmp_path.glob(".store.tmp*"))
    with pytest.raises(StoreError, match="an incomplete store"):
        open_store(leftover)
    prepare(load_recipe(recipe_file), data_dir, out)  # a new prepare is not disturbed by the leftover
    assert open_store(out, load_recipe(recipe_file), data_dir).manifest["splits"]["train"]["read"] == 600


def test_the_datasets_streaming_path_reads_a_local_directory(tmp_path):
    from .conftest import DE, EN

    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("validation", 20)):
        (tmp_path / "hub").mkdir(exist_ok=True)
        rows = []
        for _ in range(n):
            idx = rng.integers(0, len(EN), rng.integers(2, 8))
            rows.append({"translation": {"en": " ".join(EN[i] for i in idx), "de": " ".join(DE[i] for i in idx)}})
        (tmp_path / "hub" / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"""
model: {{preset: tiny}}
data: {{train: {{hub: "{tmp_path / 'hub'}", split: train}}, valid: {{hub: "{tmp_path / 'hub'}", split: validation}}}}
tokenizer: {{vocab_size: 300}}
""")
    recipe = load_recipe(recipe_file)
    manifest = prepare(recipe, None, tmp_path / "store")
    store = open_store(tmp_path / "store", recipe)
    assert manifest["splits"]["train"]["pairs"] == 300 and manifest["sources"] == {"train": [], "valid": []}
    tokenizer = Tokenizer(store.tokenizer_file)
    first = json.loads((tmp_path / "hub" / "train.jsonl").read_text().splitlines()[5])["translation"]
    assert store.pairs("train").src[5].tolist() == tokenizer.encode([first["en"]])[0]
    assert len(store.references()) == 20


def test_a_language_model_store_packs_lines_into_blocks(tmp_path):
    (tmp_path / "t").mkdir()
    lines = [" ".join(["der Hund"] * (i % 5 + 1)) for i in range(400)]
    (tmp_path / "t" / "train.de").write_text("\n".join(lines) + "\n")
    recipe_file = tmp_path / "lm.yaml"
    recipe_file.write_text('model: {preset: lm_tiny}\ndata: {task: lm, tgt_lang: de, train: "t/train.{lang}", '
                           'block_size: 16}\ntokenizer: {vocab_size: 270}\n')
    recipe = load_recipe(recipe_file)
    prepare(recipe, tmp_path, tmp_path / "store")
    stream = open_store(tmp_path / "store", recipe, tmp_path).stream("train")
    tokenizer = Tokenizer(tmp_path / "store" / "spm.model")
    expected = [t for ids in tokenizer.encode(lines) for t in ids + [EOS_ID]]
    assert stream.runs(np.array([0]), np.array([len(stream)])).tolist() == expected
    loader = BlockBatches(stream, 16, max_tokens=64, shuffle=False)
    first = next(iter(loader))
    assert first["tgt_in"].shape == (4, 16) and first["tgt_in"][0].tolist() == expected[:16]
    assert first["tgt_out"][0].tolist() == expected[1:17] and first["tgt_in"][1, 0].item() == expected[16]


# -- Training from a store -------------------------------------------------------------------------------------

def test_train_from_a_prepared_store_through_the_cli(toy_run, tmp_path, capsys):
    from translator.cli import main

    data_dir, recipe = toy_run
    store = tmp_path / "prepared"
    assert main(["prepare", "--config", str(recipe), "--data-dir", str(data_dir), "--out", str(store)]) == 0
    assert "prepared" in capsys.readouterr().out and (store / "manifest.json").is_file()
    assert main(["prepare", "--config", str(recipe), "--data-dir", str(data_dir), "--out", str(store)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--prepared", str(store), "--out", str(run), "--max-steps", "3",
                 "--no-progress"]) == 0  # no --data-dir: the store is all it reads
    assert not (run / "data").exists() and (run / "spm.model").read_bytes() == (store / "spm.model").read_bytes()
    assert load_recipe(run / "config.yaml").data.prepared == str(store.resolve())
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "5", "--no-progress"]) == 0
    capsys.readouterr()
    for args, message in (
            (["--prepared", str(tmp_path / "nowhere")], "nowhere: no store; run translator prepare"),
            (["--prepared", str(store), "--data.max_len=17"], "prepared with max_len=128, but the recipe gives 17"),
            (["--num-nodes", "2"], "training on several nodes reads a prepared store")):
        code = main(["train", "--config", str(recipe), "--data-dir", str(data_dir), "--out", str(tmp_path / "x"),
                     *args])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and message in err, err
