"""What subword sampling (`tokenizer.sampling`) costs where a batch is collated: translator's seeded sampling
(translator/subword.py, Python) against sentencepiece's own sampling (C++, not reproducible across processes, which
is why translator does not use it), on Multi30k training sentences, one core, both sides, the recipe's 8000-piece
joint BPE (BPE-dropout) or a unigram model of the same size (n-best sampling).

    python benchmarks/subword_sampling.py --data-dir ../shared/data --sentences 4000 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--sentences", type=int, default=4000, help="training sentences per side")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="subword_sampling_cpu")
    args = parser.parse_args()

    import sentencepiece as spm

    from translator.data import Tokenizer, read_lines
    from translator.subword import SubwordSampling

    sides = {lang: read_lines(Path(args.data_dir) / f"multi30k/train.{lang}.gz") for lang in ("en", "de")}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in ("bpe", "unigram"):
            model_file = Path(tmp) / f"{model_type}.model"
            Tokenizer.train(sides["en"] + sides["de"], model_file, args.vocab_size, model_type)
            sp = spm.SentencePieceProcessor(model_file=str(model_file))
            texts = [line for lang in ("en", "de") for line in sides[lang][:args.sentences]]
            ids = [sp.encode(text) for text in texts]
            stored = sum(map(len, ids))
            # The same draw as translator's: BPE-dropout (BPE ignores nbest), or one of the 64 best unigram
            # segmentations (sentencepiece's nbest_size -1 would sample the whole lattice, a flatter distribution).
            nbest = -1 if model_type == "bpe" else 64
            ours = SubwordSampling(str(model_file), args.alpha, nbest, seed=1, max_len=10 ** 9)
            ours.resegment(ids[:10], (0, 0), 0)  # loads the model
            times = {"translator": [], "sentencepiece": []}
            tokens = {}
            for repeat in range(args.repeats):  # the two in turns: this machine's speed drifts
                start = time.perf_counter()
                sampled = ours.resegment(ids, (repeat, 0), 0)
                times["translator"].append(time.perf_counter() - start)
                tokens["translator"] = sum(map(len, sampled))
                spm.set_random_generator_seed(repeat + 1)
                start = time.perf_counter()
                sampled = [sp.encode(text, enable_sampling=True, alpha=args.alpha, nbest_size=nbest) for text in texts]
                times["sentencepiece"].append(time.perf_counter() - start)
                tokens["sentencepiece"] = sum(map(len, sampled))
            row = {}
            for who, seconds in times.items():
                best = min(seconds)
                row[who] = {"seconds": [round(s, 4) for s in seconds],
                            "us_per_stored_token": round(best / stored * 1e6, 2),
                            "ms_per_2048_token_side": round(best / stored * 2048 * 1e3, 1),
                            "growth": round(tokens[who] / stored, 3)}
            row["slowdown"] = round(min(times["translator"]) / min(times["sentencepiece"]), 1)
            results[model_type] = row
            for who in times:
                print(f"{model_type:8s} {who:14s} {row[who]['us_per_stored_token']:6.2f} us per token, "
                      f"{row[who]['ms_per_2048_token_side']:6.1f} ms per 2048-token side, {row[who]['growth']:.3f}x "
                      f"the tokens", flush=True)
    save_result(args.name, {"sentences_per_side": args.sentences, "alpha": args.alpha, "vocab_size": args.vocab_size,
                            "models": results, "note": "per-token figures from the fastest repeat"}, "cpu")


if __name__ == "__main__":
    main()
