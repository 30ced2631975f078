"""Device operations per decoding step, split into the model's step function and the search around it.

    python benchmarks/decode_ops.py --model runs/bench_multi30k_en_de --data-dir ../shared/data

On a GPU, decoding a small model is bound by the host: each operation costs a kernel launch and its Python and
dispatcher overhead whatever its size, so the count per step predicts GPU decoding time where a CPU timing
cannot. Counted on CPU with a dispatch mode: every ATen call that reaches a kernel; views (slices, transposes,
reshapes without a copy) are counted apart, since they launch nothing. Same sentences and settings as
decode_speed.py; --batch-sentences sets how many sentences share a batch. Each mode is counted on the CPU code
path, on the GPU one (the search has CPU-only variants of two passes) and with cuda_graphs, and beside Hugging
Face generate on the same batches (all its operations, for the ratio of launches).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

from translator.checkpoint import load_model  # noqa: E402
from translator import decoding  # noqa: E402
from translator.config import DecodeConfig  # noqa: E402
from translator.cuda_graphs import GraphedStep  # noqa: E402
from translator.data import load_corpus  # noqa: E402
from translator.inference import translate_ids  # noqa: E402

VIEWS = {"alias", "as_strided", "chunk", "detach", "detach_", "expand", "flatten", "lift_fresh", "narrow", "permute",
         "reshape", "resolve_conj", "resolve_neg", "select", "slice", "split", "squeeze", "t", "transpose", "unbind",
         "unflatten", "unsqueeze", "view", "_unsafe_view"}


class CountOps(TorchDispatchMode):
    """Counts ATen calls by (part, 'ops' or 'views'); `part` is switched by the caller, and nothing is counted
    while `paused`."""

    def __init__(self) -> None:
        super().__init__()
        self.part = "search"
        self.paused = False
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            kind = "views" if func.overloadpacket.__name__ in VIEWS else "ops"
            self.counts[self.part, kind] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def gpu_path():
    """The search's GPU code path on CPU: one-stage top-k and logsumexp (the CPU has faster variants)."""
    topk, normaliser = decoding._topk, decoding._log_normaliser
    decoding._topk = lambda x, k, block=64: x.topk(k, dim=-1)
    decoding._log_normaliser = lambda logits, top=None, rows=64: torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    try:
        yield
    finally:
        decoding._topk, decoding._log_normaliser = topk, normaliser


def batches(sources: list[list[int]], batch_sentences: int, batch_tokens: int | None) -> list[list[list[int]]]:
    """Fixed-size batches, or with batch_tokens a single call, which translate_ids and run_hf batch by tokens."""
    if batch_tokens:
        return [sources]
    return [sources[i:i + batch_sentences] for i in range(0, len(sources), batch_sentences)]


def count(model, sources: list[list[int]], mode: str, batch_sentences: int, graphs: bool = False,
          batch_tokens: int | None = None) -> dict:
    """Operations of translate_ids per step. graphs: with cuda_graphs, where each fixed-shape step counts as one
    operation (its graph's replay is one launch); the rest of GraphedStep, and its eager steps, count as they come."""
    counter, steps = CountOps(), [0]
    options = DecodeConfig(beam=4, lenpen=1.0, lp_form="length", max_len_a=1.0, max_len_b=50,
                           batch_tokens=batch_tokens or 10 ** 9, cuda_graphs=graphs)
    step_call, fixed_step, model_step = GraphedStep.__call__, GraphedStep._step, model.step

    def counted_step(*args):
        counter.part, steps[0] = "model", steps[0] + 1
        try:
            return (step_call if graphs else model_step)(*args)
        finally:
            counter.part = "search"

    def replay(self, state):
        counter.counts["model", "ops"] += 1
        counter.paused = True
        try:
            return fixed_step(self, state)
        finally:
            counter.paused = False

    if graphs:
        GraphedStep.__call__, GraphedStep._step = counted_step, replay
    else:
        model.step = counted_step
    try:
        with counter:
            for batch in batches(sources, batch_sentences, batch_tokens):
                translate_ids(model, batch, options, mode="beam" if mode == "beam4" else mode)
    finally:
        GraphedStep.__call__, GraphedStep._step = step_call, fixed_step
        vars(model).pop("step", None)
    ops = sum(n for (_, kind), n in counter.counts.items() if kind == "ops")
    per_step = {f"{part}_{kind}_per_step": round(n / steps[0], 1) for (part, kind), n in sorted(counter.counts.items())}
    return {"steps": steps[0], **per_step, "ops_per_step": round(ops / steps[0], 1), "ops": ops}


def count_hf(model, sources: list[list[int]], mode: str, batch_sentences: int, batch_tokens: int | None = None) -> dict:
    """Operations of Hugging Face generate on the same weights, sentences and batches, as decode_speed.py runs it."""
    from decode_speed import run_hf
    from hf_marian import to_marian

    hf, counter = to_marian(model), CountOps()
    with counter, torch.inference_mode():
        for batch in batches(sources, batch_sentences, batch_tokens):
            run_hf(hf, batch, 4 if mode == "beam4" else 1, batch_tokens or 10 ** 9, model.cfg, "cpu")
    return {"ops": sum(n for (_, kind), n in counter.counts.items() if kind == "ops")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/bench_multi30k_en_de", help="a trained run directory")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--sentences", type=int, default=64, help="how many test2016 sentences")
    parser.add_argument("--batch-sentences", type=int, default=8)
    parser.add_argument("--batch-tokens", type=int, help="batch by source tokens instead, as decode_speed.py does "
                                                           "(its runs use 4096); saved as decode_ops_batch_tokens_N")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()

    model, tokenizer, recipe = load_model(args.model)
    corpus = load_corpus(recipe.data.test, recipe.data.src_lang, recipe.data.tgt_lang, args.data_dir)
    sources = tokenizer.encode(corpus.src[: args.sentences])
    metrics: dict = {"sentences": len(sources), "batch_sentences": None if args.batch_tokens else args.batch_sentences,
                     "batch_tokens": args.batch_tokens}
    per_batch = {"batch_sentences": args.batch_sentences, "batch_tokens": args.batch_tokens}
    for mode in ("greedy", "beam4"):
        row = metrics[mode] = {"cpu_path": count(model, sources, mode, **per_batch)}
        with gpu_path():
            row["gpu_path"] = count(model, sources, mode, **per_batch)
            row["gpu_path_cuda_graphs"] = count(model, sources, mode, graphs=True, **per_batch)
        if not args.skip_hf:
            row["hf_generate_ops"] = count_hf(model, sources, mode, **per_batch)["ops"]
            for path in ("gpu_path", "gpu_path_cuda_graphs"):
                row[f"hf_ops_over_{path}_ops"] = round(row["hf_generate_ops"] / row[path]["ops"], 2)
        print(mode, row, flush=True)
    save_result(f"decode_ops_batch_tokens_{args.batch_tokens}" if args.batch_tokens else "decode_ops", metrics, "cpu",
                model=args.model,
                notes="ATen calls per decoding step on CPU; 'ops' reach a kernel (a launch on a GPU), 'views' do not. "
                      "gpu_path: the search's GPU code (one-stage top-k, logsumexp); cuda_graphs: a fixed-shape "
                      "step counts as one replay. hf_generate_ops: all of generate's operations on the same batches")


if __name__ == "__main__":
    main()
