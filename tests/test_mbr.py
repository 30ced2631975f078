"""MBR selection (translator/mbr.py): its utilities against sacrebleu's sentence scores, its choice against a
brute-force expected utility, and `translate --mbr` end to end on the toy model."""

import collections

import pytest
from sacrebleu.metrics import BLEU, CHRF

from translator.cli import main
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


def read_nbest(path):
    found = collections.defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        i, text, _ = line.split(" ||| ")
        found[int(i)].append(text)
    return found


def test_translate_mbr_outputs_the_best_of_the_nbest_by_expected_bleu(toy_model_dir, tmp_path, capsys):
    run_dir, data_dir = toy_model_dir
    lines = (data_dir / "toy/valid.en").read_text().splitlines()[:30]
    source = tmp_path / "in.en"
    source.write_text("".join(line + "\n" for line in lines[:10] + [""] + lines[10:]))
    assert main(["translate", "--model", str(run_dir), "-i", str(source), "-o", str(tmp_path / "nbest"),
                 "--beam", "5", "--nbest", "5"]) == 0
    assert main(["translate", "--model", str(run_dir), "-i", str(source), "-o", str(tmp_path / "mbr"),
                 "--mbr", "5"]) == 0
    assert main(["translate", "--model", str(run_dir), "-i", str(source), "-o", str(tmp_path / "mbr_nbest"),
                 "--mbr", "5", "--nbest", "5"]) == 0
    nbest, reordered = read_nbest(tmp_path / "nbest"), read_nbest(tmp_path / "mbr_nbest")
    chosen = (tmp_path / "mbr").read_text(encoding="utf-8").splitlines()
    assert len(chosen) == len(lines) + 1 and chosen[10] == ""
    bleu, differ = BLEU(effective_order=True), 0
    for i, line in enumerate(chosen):
        gains = brute_force(nbest[i], bleu)
        assert sorted(reordered[i]) == sorted(nbest[i])  # the same candidates, another order
        assert reordered[i][0] == line
        assert gains[nbest[i].index(line)] == pytest.approx(max(gains), abs=1e-9)
        differ += line != nbest[i][0]
    assert differ > 0  # on the toy model, MBR changes some outputs: the test checks a real choice


def test_translate_mbr_refuses_what_it_cannot_rerank(toy_model_dir, tmp_path, capsys):
    run_dir, _ = toy_model_dir
    source = tmp_path / "in.en"
    source.write_text("a b c\n")
    for extra in (["--sample"], ["--speculate", "heads"], ["--mbr", "1"]):
        assert main(["translate", "--model", str(run_dir), "-i", str(source), "-o", str(tmp_path / "out"),
                     "--mbr", "4", *extra]) != 0
        assert "--mbr" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
