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
    # Our limit is per sentence (a * source length with EOS + b); CTranslate2's is per call: one call per limit,
    # so that a sentence that never ends stops at the same length in both.
    limits = [int(options.max_len_a * (len(s) + 1) + options.max_len_b) for s in sources]
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

