"""MBR decoding against beam search on a run's validation (or test) split: corpus sacreBLEU and chrF of beam
search's best, and of the MBR choice among its N best for each N and utility, from one search per N.

    python benchmarks/mbr.py --model runs/bench_multi30k_en_de --data-dir ../shared/data --sizes 4 8 16

For BLEU, with both weightings of the candidates as references: uniform (`mbr_bleu`) and the model's
(`mbr_bleu_weighted`: the softmax of the search scores over the N best, `translate --mbr`'s default); and the
seconds each part takes.

With --samples M, also MBR with sampled candidates (Freitag et al. 2023 found epsilon sampling's the best
candidates for MBR): M epsilon samples per sentence (`--epsilon`), alone (`samples`: candidates and uniform
pseudo-references), and together with the N best of the last of --sizes (`nbest_samples_mix_L`: every candidate is
a hypothesis; as references the N best carry weight L, by the model's softmax, and the samples 1 - L, uniformly).

    python benchmarks/mbr.py --model runs/bench_multi30k_en_de --sizes 16 --samples 64 --epsilon 0.02

Choose on validation (the default split); look at test once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

from translator.checkpoint import load_model  # noqa: E402
from translator.data import load_corpus  # noqa: E402
from translator.inference import translate_hypotheses  # noqa: E402
from translator.lines import one_line  # noqa: E402
from translator.mbr import expected_utility, mbr_order, model_weights  # noqa: E402


def sampled_mbr(model, tokenizer, ids, decode, texts, found, args, score) -> dict:
    """MBR with args.samples epsilon samples per sentence: alone, and mixed with the N best (`texts`, `found`)."""
    import torch

    start = time.perf_counter()
    repeated = [s for s in ids for _ in range(args.samples)]
    drawn = translate_hypotheses(model, repeated, decode, mode="sample", sampling={"epsilon": args.epsilon},
                                 generator=torch.Generator().manual_seed(args.seed))
    flat = [one_line(t) for t in tokenizer.decode([hyps[0].tokens for hyps in drawn])]
    samples = [flat[i * args.samples:(i + 1) * args.samples] for i in range(len(ids))]
    row = {"epsilon": args.epsilon, "sample_s": round(time.perf_counter() - start, 1), "nbest": len(texts[0])}
    start = time.perf_counter()
    row["samples"] = score([s[mbr_order(s)[0]] for s in samples])
    row["samples_s"] = round(time.perf_counter() - start, 1)
    for share in args.mix:
        start = time.perf_counter()
        chosen = []
        for nbest, hyps, drawn_here in zip(texts, found, samples):
            beam_weights = model_weights([h.score for h in hyps])
            total = sum(beam_weights)
            weights = [share * w / total for w in beam_weights] + [(1 - share) / len(drawn_here)] * len(drawn_here)
            candidates = nbest + drawn_here
            gains = expected_utility(candidates, "bleu", weights)
            chosen.append(candidates[gains.index(max(gains))])  # ties: the first, as mbr_order keeps them
        row[f"nbest_samples_mix_{share}"] = score(chosen)
        row[f"nbest_samples_mix_{share}_s"] = round(time.perf_counter() - start, 1)
    print("samples", row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a run directory")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--split", default="valid", choices=["valid", "test"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16], help="candidates (beam size) per setting")
    ap.add_argument("--sentences", type=int, default=0, help="the first N sentences only (0: all)")
    ap.add_argument("--samples", type=int, default=0, help="epsilon samples per sentence as MBR candidates (0: none)")
    ap.add_argument("--epsilon", type=float, default=0.02)
    ap.add_argument("--mix", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                    help="the N best's share of the pseudo-references' weight, with --samples")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()

    import dataclasses

    import sacrebleu

    model, tokenizer, recipe = load_model(args.model, "cpu")
    corpus = load_corpus(getattr(recipe.data, args.split), recipe.data.src_lang, recipe.data.tgt_lang, args.data_dir)
    src, refs = list(corpus.src), list(corpus.tgt)
    if args.sentences:
        src, refs = src[:args.sentences], refs[:args.sentences]
    ids = tokenizer.encode([s.strip() for s in src])

    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()

    def score(hyps: list[str]) -> dict:
        return {"bleu": round(bleu.corpus_score(hyps, [refs]).score, 2),
                "chrf": round(chrf.corpus_score(hyps, [refs]).score, 2)}

    metrics: dict = {"sentences": len(src), "split": args.split, "lenpen": recipe.decode.lenpen,
                     "lp_form": recipe.decode.lp_form}
    for n in dict.fromkeys([recipe.decode.beam, *args.sizes]):  # the recipe's beam first, for its best
        options = dataclasses.replace(recipe.decode, beam=n, mbr=0)
        start = time.perf_counter()
        found = translate_hypotheses(model, ids, options, mode="beam", nbest=n)
        search_s = time.perf_counter() - start
        texts = [[one_line(t) for t in tokenizer.decode([h.tokens for h in hyps])] for hyps in found]
        row = {"search_s": round(search_s, 1), "beam_best": score([t[0] for t in texts])}
        for key, utility, weighted in (("mbr_bleu", "bleu", False), ("mbr_chrf", "chrf", False),
                                       ("mbr_bleu_weighted", "bleu", True)):
            start = time.perf_counter()
            chosen = [t[mbr_order(t, utility, [h.score for h in hyps] if weighted else None)[0]]
                      for t, hyps in zip(texts, found)]
            row[f"{key}_s"] = round(time.perf_counter() - start, 1)
            row[key] = score(chosen)
            row[f"{key}_changed"] = sum(c != t[0] for c, t in zip(chosen, texts))
        metrics[f"beam_{n}"] = row
        print(n, row, flush=True)
    if args.samples:
        metrics[f"samples_{args.samples}"] = sampled_mbr(model, tokenizer, ids, recipe.decode, texts, found, args, score)
    name = args.name or f"mbr_{Path(args.model).name}_{args.split}"
    save_result(name, metrics, "cpu", bleu_signature=str(bleu.get_signature()))


if __name__ == "__main__":
    main()
