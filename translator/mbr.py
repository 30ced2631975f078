"""Minimum Bayes risk (MBR) selection over a sentence's candidate translations (Kumar & Byrne 2004; Freitag et
al. 2022): pick the candidate with the highest expected utility against all the candidates, each taken as a
pseudo-reference, instead of the one the model scores highest.

The utility is sentence-level sacreBLEU (13a tokens, exponential smoothing, effective order: sacrebleu's
sentence_score) or chrF. For BLEU, each candidate is tokenized and its n-grams counted once, and every pair is
scored from those counts with sacrebleu's own functions: N candidates cost N tokenizations instead of the N^2 of
calling sentence_score per pair (written here because sacrebleu offers no pairwise form; the result is
sentence_score's, to the digit, as the tests check)."""

from __future__ import annotations

import math
from collections.abc import Sequence

UTILITIES = ("bleu", "chrf")
_MAX_ORDER = 4


def _bleu_matrix(candidates: Sequence[str]) -> list[list[float]]:
    """u[i][j]: sentence BLEU of candidate i against candidate j as the reference."""
    from sacrebleu.metrics.bleu import BLEU
    from sacrebleu.metrics.helpers import extract_all_word_ngrams
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokenize = Tokenizer13a()
    counted = [extract_all_word_ngrams(tokenize(c.rstrip()), 1, _MAX_ORDER) for c in candidates]
    u = []
    for hyp_grams, hyp_len in counted:
        row = []
        for ref_grams, ref_len in counted:
            correct, total = [0] * _MAX_ORDER, [0] * _MAX_ORDER
            for gram, count in hyp_grams.items():
                total[len(gram) - 1] += count
                if gram in ref_grams:
                    correct[len(gram) - 1] += min(count, ref_grams[gram])
            row.append(BLEU.compute_bleu(correct, total, hyp_len, ref_len, smooth_method="exp",
                                         effective_order=True).score)
        u.append(row)
    return u


def _chrf_matrix(candidates: Sequence[str]) -> list[list[float]]:
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    return [[chrf.sentence_score(h, [r]).score for r in candidates] for h in candidates]


def expected_utility(candidates: Sequence[str], utility: str = "bleu",
                     weights: Sequence[float] | None = None) -> list[float]:
    """Each candidate's expected utility against all candidates as pseudo-references, weighted by `weights`
    (uniform when None: the candidates stand for the model's distribution)."""
    if utility not in UTILITIES:
        raise ValueError(f"MBR utility {utility!r}: expected one of {', '.join(UTILITIES)}")
    if not candidates:
        return []
    u = (_bleu_matrix if utility == "bleu" else _chrf_matrix)(candidates)
    w = [1.0] * len(candidates) if weights is None else list(weights)
    total = sum(w)
    return [sum(wj * uij for wj, uij in zip(w, row)) / total for row in u]


def model_weights(scores: Sequence[float]) -> list[float]:
    """Weights proportional to the softmax of the candidates' log-scores: the model's distribution restricted to
    the N best (expected_utility normalises them)."""
    top = max(scores)
    return [math.exp(s - top) for s in scores]


def mbr_order(candidates: Sequence[str], utility: str = "bleu", scores: Sequence[float] | None = None) -> list[int]:
    """The candidates' indices by expected utility, best first; ties keep the given (model's) order. With `scores`
    (the model's log-scores), each candidate weighs as a reference by its softmax; uniformly without."""
    gains = expected_utility(candidates, utility, None if scores is None else model_weights(scores))
    return sorted(range(len(candidates)), key=lambda i: -gains[i])
