"""CTranslate2 export: the exported model decodes exactly like ours."""

import pytest

from translator.checkpoint import load_model
from translator.cli import main as cli
from translator.config import DecodeConfig
from translator.inference import translate_ids

ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is in the test extras: pip install -e '.[test]'")


def test_ctranslate2_greedy_equals_ours(toy_model_dir, tmp_path):
    run, data_dir = toy_model_dir
    out = tmp_path / "ct2"
    assert cli(["export", "--model", str(run), "--format", "ctranslate2", "-o", str(out)]) == 0
    assert (out / "model.bin").exists() and (out / "spm.model").exists()

    model, tokenizer, _ = load_model(run)
    lines = (data_dir / "toy" / "valid.en").read_text().splitlines()[:64]
    sources = tokenizer.encode(lines)
    options = DecodeConfig(beam=1)
    ours = [hyps[0] for hyps in translate_ids(model, sources, options, mode="greedy")]

    translator = ctranslate2.Translator(str(out), device="cpu", compute_type="float32")
    pieces = [[tokenizer.sp.id_to_piece(i) for i in s] for s in sources]
    # Our limit is per sentence (a * source length + b, the source's EOS not counted); CTranslate2's is per call:
    # one call per limit, so that a sentence that never ends stops at the same length in both.
    limits = [int(options.max_len_a * len(s) + options.max_len_b) for s in sources]
    theirs = [None] * len(sources)
    for limit in set(limits):
        rows = [i for i, n in enumerate(limits) if n == limit]
        results = translator.translate_batch([pieces[i] for i in rows], beam_size=1, max_decoding_length=limit)
        for i, r in zip(rows, results):
            theirs[i] = [tokenizer.sp.piece_to_id(p) for p in r.hypotheses[0]]

    assert sum(len(t) for t in ours) > 3 * len(ours)  # a trained model that writes sentences, not EOS at once
    assert theirs == ours
    # And as text: what a deployment on CTranslate2 would print.
    assert tokenizer.decode(theirs) == tokenizer.decode(ours)



def test_export_never_replaces_what_is_not_an_export(toy_model_dir, tmp_path, capsys):
    run, _ = toy_model_dir
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert cli(["export", "--model", str(run), "--format", "ctranslate2", "-o", str(run)]) == 1
    assert "run: exists and is not a CTranslate2 export (checkpoints, config.yaml" in capsys.readouterr().err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # the run directory is untouched

    other = tmp_path / "notes"
    other.mkdir()
    (other / "important.txt").write_text("keep me")
    assert cli(["export", "--model", str(run), "--format", "ctranslate2", "-o", str(other)]) == 1
    assert "notes: exists and is not a CTranslate2 export (important.txt)" in capsys.readouterr().err
    assert (other / "important.txt").read_text() == "keep me" and len(list(other.iterdir())) == 1


def test_export_replaces_an_earlier_export(toy_model_dir, tmp_path):
    run, _ = toy_model_dir
    out = tmp_path / "ct2"
    assert cli(["export", "--model", str(run), "--format", "ctranslate2", "-o", str(out)]) == 0
    float32 = (out / "model.bin").stat().st_size
    assert cli(["export", "--model", str(run), "--format", "ctranslate2", "-o", str(out), "--quantization",
                "int8"]) == 0
    assert (out / "model.bin").stat().st_size < float32 / 2 and (out / "spm.model").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2"]  # no staging or old copies left beside it


def test_hugging_face_export_translates_like_translate_beam_1(toy_model_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extras")
    run, data_dir = toy_model_dir
    out = tmp_path / "hf"
    assert cli(["export", "--model", str(run), "--format", "huggingface", "-o", str(out)]) == 0
    lines = (data_dir / "toy" / "valid.en").read_text().splitlines()[:24]
    source = tmp_path / "in.en"
    source.write_text("".join(line + "\n" for line in lines))
    capsys.readouterr()
    assert cli(["translate", "--model", str(run), "-i", str(source), "--beam", "1"]) == 0
    ours = capsys.readouterr().out.splitlines()
    pipe = transformers.pipeline("translation", model=str(out), device="cpu")
    theirs = [r["translation_text"] for r in pipe(lines, num_beams=1)]
    assert len(set(ours)) > 15 and theirs == ours
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(out))  # the other way users load it
    assert model.generation_config.num_beams == 2 and model.generation_config.bad_words_ids == [[0], [1]]
