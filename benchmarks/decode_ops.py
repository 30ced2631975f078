"""Device operations per decoding step, split into the model's step function and the search around it.

    python benchmarks/decode_ops.py --model runs/bench_multi30k_en_de --data-dir ../shared/data

On a GPU, decoding a small model is bound by the host: each operation costs a kernel launch and its Python and
dispatcher overhead whatever its size, so the count per step predicts GPU decoding time where a CPU timing
cannot. Counted on CPU with a dispatch mode: every ATen call that reaches a kernel; views (slices, transposes,
reshapes without a copy) are counted apart, since they launch nothing. Same sentences and settings as
decode_speed.py; --batch-sentences sets how many sentences share a batch.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

from translator.checkpoint import load_model  # noqa: E402
from translator.config import DecodeConfig  # noqa: E402
from translator.data import load_corpus  # noqa: E402
from translator.inference import translate_ids  # noqa: E402

VIEWS = {"alias", "as_strided", "chunk", "detach", "detach_", "expand", "flatten", "lift_fresh", "narrow", "permute",
         "reshape", "resolve_conj", "resolve_neg", "select", "slice", "split", "squeeze", "t", "transpose", "unbind",
         "unflatten", "unsqueeze", "view", "_unsafe_view"}


class CountOps(TorchDispatchMode):
    """Counts ATen calls by (part, 'ops' or 'views'); `part` is switched by the caller."""

    def __init__(self) -> None:
        super().__init__()
        self.part = "search"
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = "views" if func.overloadpacket.__name__ in VIEWS else "ops"
        self.counts[self.part, kind] += 1
        return func(*args, **(kwargs or {}))


def count(model, sources: list[list[int]], mode: str, batch_sentences: int) -> dict:
    counter, step, steps = CountOps(), model.step, [0]

    def counted_step(tokens, state):
        counter.part, steps[0] = "model", steps[0] + 1
        try:
            return step(tokens, state)
        finally:
            counter.part = "search"

    options = DecodeConfig(beam=4, lenpen=1.0, lp_form="length", max_len_a=1.0, max_len_b=50, batch_tokens=10 ** 9)
    model.step = counted_step
    try:
        with counter:
            for i in range(0, len(sources), batch_sentences):
                translate_ids(model, sources[i:i + batch_sentences], options, mode="beam" if mode == "beam4" else mode)
    finally:
        del model.step
    per_step = {f"{part}_{kind}_per_step": round(n / steps[0], 1) for (part, kind), n in sorted(counter.counts.items())}
    return {"steps": steps[0], **per_step,
            "ops_per_step": round(sum(n for (_, kind), n in counter.counts.items() if kind == "ops") / steps[0], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/bench_multi30k_en_de", help="a trained run directory")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--sentences", type=int, default=64, help="how many test2016 sentences")
    parser.add_argument("--batch-sentences", type=int, default=8)
    args = parser.parse_args()

    model, tokenizer, recipe = load_model(args.model)
    corpus = load_corpus(recipe.data.test, recipe.data.src_lang, recipe.data.tgt_lang, args.data_dir)
    sources = tokenizer.encode(corpus.src[: args.sentences])
    metrics: dict = {"sentences": len(sources), "batch_sentences": args.batch_sentences}
    for mode in ("greedy", "beam4"):
        metrics[mode] = count(model, sources, mode, args.batch_sentences)
        print(mode, metrics[mode], flush=True)
    save_result("decode_ops", metrics, "cpu", model=args.model,
                notes="ATen calls per decoding step on CPU; 'ops' reach a kernel (a launch on a GPU), 'views' do not")


if __name__ == "__main__":
    main()
