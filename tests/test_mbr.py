"""MBR selection (translator/mbr.py): its utilities against sacrebleu's sentence scores, its choice against a
brute-force expected utility, and `translate --mbr` end to end on the toy model."""

import collections
import dataclasses
import math

import pytest
from sacrebleu.metrics import BLEU, CHRF

from translator.checkpoint import load_model
from translator.cli import main
from translator.lines import translate_lines
from translator.mbr import expected_utility, mbr_order

SENTENCES = [
    "Ein Mann in einem blauen Hemd steht auf einer Leiter.",
    "Ein Mann im blauen Hemd steht auf einer Leiter und putzt ein Fenster.",
    "Zwei Hunde spielen im Schnee.",
    "Ein Mann steht auf einer Leiter.",
    "",
    "Ein Mann in einem blauen Hemd steht auf einer Leiter.",
    "Leiter",
]


def brute_force(candidates, metric):
    return [sum(metric.sentence_score(h, [r]).score for r in candidates) / len(candidates) for h in candidates]


@pytest.mark.parametrize("utility, metric", [("bleu", BLEU(effective_order=True)), ("chrf", CHRF())])
def test_expected_utility_is_the_mean_sentence_score_against_every_candidate(utility, metric):
    assert expected_utility(SENTENCES, utility) == pytest.approx(brute_force(SENTENCES, metric), abs=1e-9)


def test_weights_shift_the_expectation_towards_likely_candidates():
    bleu = BLEU(effective_order=True)
    weights = [0.1, 0.2, 3.0, 0.4, 0.1, 0.1, 0.1]
    want = [sum(w * bleu.sentence_score(h, [r]).score for w, r in zip(weights, SENTENCES)) / sum(weights)
            for h in SENTENCES]
    assert expected_utility(SENTENCES, "bleu", weights) == pytest.approx(want, abs=1e-9)
    assert max(range(len(SENTENCES)), key=expected_utility(SENTENCES, "bleu", weights).__getitem__) == 2


def test_the_consensus_candidate_wins_and_ties_keep_the_models_order():
    order = mbr_order(SENTENCES)
    assert order[0] == 0  # the sentence two candidates share, and closest to the rest; 5 is its tie, after it
    assert order.index(0) < order.index(5)
    assert sorted(order) == list(range(len(SENTENCES)))
    with pytest.raises(ValueError, match="utility 'ter'"):
        mbr_order(SENTENCES, "ter")


def test_translate_mbr_outputs_the_best_of_the_nbest_by_expected_bleu(toy_model_dir, tmp_path, capsys):
    run_dir, data_dir = toy_model_dir
    lines = (data_dir / "toy/valid.en").read_text().splitlines()[:30]
    lines = lines[:10] + [""] + lines[10:]
    source = tmp_path / "in.en"
    source.write_text("".join(line + "\n" for line in lines))
    model, tokenizer, recipe = load_model(run_dir)
    nbest = translate_lines(model, tokenizer, lines, dataclasses.replace(recipe.decode, beam=5), "beam", 5)
    for weights in ("model", "uniform"):
        out = tmp_path / f"mbr_{weights}"
        assert main(["translate", "--model", str(run_dir), "-i", str(source), "-o", str(out), "--mbr", "5",
                     "--mbr-weights", weights]) == 0
        assert main(["translate", "--model", str(run_dir), "-i", str(source), "-o", str(out) + ".nbest",
                     "--mbr", "5", "--mbr-weights", weights, "--nbest", "5"]) == 0
        chosen = out.read_text(encoding="utf-8").splitlines()
        reordered = collections.defaultdict(list)
        for line in (tmp_path / f"mbr_{weights}.nbest").read_text(encoding="utf-8").splitlines():
            i, text, _ = line.split(" ||| ")
            reordered[int(i)].append(text)
        assert len(chosen) == len(lines) and chosen[10] == ""
        bleu, differ = BLEU(effective_order=True), 0
        for i, line in enumerate(chosen):
            if i == 10:  # the empty line, which never reaches the model
                continue
            texts, scores = nbest.texts[i], nbest.scores[i]
            w = [math.exp(s - max(scores)) for s in scores] if weights == "model" else [1.0] * len(texts)
            gains = [sum(wj * bleu.sentence_score(h, [r]).score for wj, r in zip(w, texts)) / sum(w) for h in texts]
            assert sorted(reordered[i]) == sorted(texts)  # the same candidates, another order
            assert reordered[i][0] == line
            assert gains[texts.index(line)] == pytest.approx(max(gains), abs=1e-9)
            differ += line != texts[0]
        assert differ > 0  # on the toy model, MBR changes some outputs: the test checks a real choice


def test_translate_mbr_refuses_what_it_cannot_rerank(toy_model_dir, tmp_path, capsys):
    run_dir, _ = toy_model_dir
    source = tmp_path / "in.en"
    source.write_text("a b c\n")
    for extra in (["--sample"], ["--speculate", "heads"], ["--beam", "1"], ["--mbr", "1"]):
        assert main(["translate", "--model", str(run_dir), "-i", str(source), "-o", str(tmp_path / "out"),
                     "--mbr", "4", *extra]) != 0
        assert "--mbr" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_recipes_mbr_yields_to_greedy(toy_model_dir):
    run_dir, data_dir = toy_model_dir
    lines = (data_dir / "toy/valid.en").read_text().splitlines()[:8]
    model, tokenizer, recipe = load_model(run_dir)
    with_mbr = dataclasses.replace(recipe.decode, beam=4, mbr=4)
    greedy = translate_lines(model, tokenizer, lines, dataclasses.replace(with_mbr, mbr=0), "greedy").texts
    assert translate_lines(model, tokenizer, lines, with_mbr, "greedy").texts == greedy


def test_serve_answers_with_the_recipes_mbr_and_greedy_for_beam_1(toy_model_dir):
    from translator.serve import Translator

    run_dir, data_dir = toy_model_dir
    # All 100 lines: MBR departs from beam search's best on about a fifth of them, which ones depending on how
    # the toy model's training rounded.
    lines = (data_dir / "toy/valid.en").read_text().splitlines()
    model, tokenizer, recipe = load_model(run_dir)
    recipe.decode = dataclasses.replace(recipe.decode, mbr=5)
    served = Translator(model, tokenizer, recipe, [str(run_dir)])
    lenpen = recipe.decode.lenpen
    mbr = translate_lines(model, tokenizer, lines, dataclasses.replace(recipe.decode, beam=4), "beam").texts
    plain = translate_lines(model, tokenizer, lines, dataclasses.replace(recipe.decode, beam=4, mbr=0), "beam").texts
    greedy = translate_lines(model, tokenizer, lines, dataclasses.replace(recipe.decode, mbr=0), "greedy").texts
    assert [text for text, _ in served((4, lenpen, 1, False), lines, None)] == [t[0] for t in mbr]
    assert [text for text, _ in served((1, lenpen, 1, False), lines, None)] == [t[0] for t in greedy]
    assert mbr != plain  # the reply is MBR's choice, not beam search's best
